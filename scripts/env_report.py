"""What this machine offers train_gpt.py: Python, torch and CUDA versions, the GPU, the SDPA backends,
FlashAttention 3 / 2 availability and the attention backend train_gpt.py would pick. One `name value`
line each (scripts/gpu_check.sh runs it first).

    python3 scripts/env_report.py
"""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

OPTIONAL_MODULES = ("flash_attn_interface", "flash_attn", "triton")  # FA3, FA2, the compiler's kernels


def report() -> list[str]:
    cuda = torch.cuda.is_available()
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"cuda {torch.version.cuda} available:{cuda}"]
    if cuda:
        p = torch.cuda.get_device_properties(0)
        lines += [f"gpu {p.name} capability:{p.major}.{p.minor} memory_gib:{p.total_memory / 2**30:.1f} "
                  f"sms:{p.multi_processor_count} count:{torch.cuda.device_count()}",
                  f"sdpa flash:{torch.backends.cuda.flash_sdp_enabled()} cudnn:{torch.backends.cuda.cudnn_sdp_enabled()} "
                  f"mem_efficient:{torch.backends.cuda.mem_efficient_sdp_enabled()}"]
    for name in OPTIONAL_MODULES:
        try:
            module = importlib.import_module(name)
            lines.append(f"module {name} {getattr(module, '__version__', 'importable')}")
        except Exception as e:  # an import can fail in many ways (missing library, wrong CUDA)
            lines.append(f"module {name} not_importable ({type(e).__name__}: {str(e)[:80]})")
    backend, _, why = tg.select_attention(torch.device("cuda" if cuda else "cpu"))
    lines.append(f"attention_backend {backend} reason:{why}")
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
