"""``--verify``: run both sides of a conversion on the same random tokens and compare their logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megamix.convert.architectures import architecture_of_hf
from megamix.convert.directions import load_model_state
from megamix.convert.hf import read_hf_config
from megamix.errors import ConfigError
from megamix.models import HybridModel


@dataclass
class Agreement:
    max_abs_diff: float  # max |Δlogit| over every position and vocabulary entry
    kl: float  # mean KL(HF ‖ megamix) of the next-token distributions, in nats

    def __str__(self) -> str:
        return f"max |Δlogit| {self.max_abs_diff:.3e}, KL(hf ‖ megamix) {self.kl:.3e}"


def load_megamix_model(checkpoint: str | Path) -> HybridModel:
    """A single-process fp32 HybridModel holding a checkpoint's weights."""
    model_config, tensors, _ = load_model_state(checkpoint)
    model = HybridModel(model_config, device="meta")  # no initialisation: every saved tensor is assigned below
    model.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=True, assign=True)
    for module in model.modules():  # unsaved buffers (MoE's per-step token counts) start at zero
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return model.eval()


def compare(hf_dir: str | Path, checkpoint: str | Path, batch: int = 2, seq_len: int = 64,
            seed: int = 0) -> Agreement:
    """Logit agreement between an HF model directory and a megamix checkpoint, both in fp32 on CPU."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("--verify needs transformers (pip install 'megamix[dev]')") from None
    hf_dir = Path(hf_dir)
    arch = architecture_of_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    ours = load_megamix_model(checkpoint)
    hf = getattr(transformers, arch.name).from_pretrained(hf_dir, dtype=torch.float32)
    tokens = torch.randint(0, ours.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, actual = hf.eval()(tokens).logits, ours(tokens)
    # float64: at fp32 the KL of near-identical distributions drowns in rounding (and can come out negative)
    kl = F.kl_div(actual.double().log_softmax(-1), expected.double().log_softmax(-1), log_target=True,
                  reduction="none").sum(-1)
    return Agreement((actual - expected).abs().max().item(), kl.mean().item())
