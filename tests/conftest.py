import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="session")
def sample_text() -> str:
    return os.path.join(FIXTURES, "sample.txt")


def calibration_ids(rows: int = 4, seq_len: int = 64, seed: int = 0, vocab: int = 320) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


def quantize_with_llmcompressor(model_dir, out_dir, scheme: str, ids: torch.Tensor, dtype=torch.float32):
    """Quantize the model in ``model_dir`` with llm-compressor's QuantizationModifier (RTN weights; NVFP4 input
    global scales from ``ids``) and save it compressed to ``out_dir``. Returns the in-memory fake-quant model's
    logits on ``ids``, taken before saving (saving compresses the in-memory model)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(
        model=model,
        dataset=data,
        recipe=QuantizationModifier(
            targets="Linear", scheme=scheme, ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
        ),
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
    )
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(str(out_dir), save_compressed=True)
    return logits
