"""Which HF tensors make up each megamix tensor, per mixer kind.

A :class:`Link` ties one megamix tensor to the HF tensors stacked along dim 0 (rows) into it, so
import concatenates them and export splits it back; the layouts agree otherwise, checked against
transformers 5.23:

- attention: megamix ``qkv_proj`` rows are ``[q heads | k heads | v heads]``; HF's rotary is the
  rotate-half form megamix uses, so q and k need no permutation;
- gated MLP: ``gate_up_proj`` rows are ``[gate | up]`` (Llama gate/up, Mixtral w1/w3);
- Mamba-2: HF ``in_proj`` rows are ``[z | x | B | C | Δ]`` and ``conv1d`` channels ``[x | B | C]``,
  megamix's order too; the gated norm normalises y·silu(z) per group of d_inner / G in both.
"""

from __future__ import annotations

from dataclasses import dataclass

from megamix.config import ModelConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Link:
    """megamix tensor ``name`` (no ``model.`` prefix) = its HF ``parts`` (name, shape) stacked along rows.

    With no parts the tensor has no HF counterpart and holds zeros (MoE's selection bias): import
    writes zeros, export refuses a non-zero one.
    """

    name: str
    parts: tuple[tuple[str, Shape], ...]
    shape: Shape

    @staticmethod
    def stack(name: str, *parts: tuple[str, Shape]) -> Link:
        rows = sum(shape[0] for _, shape in parts)
        return Link(name, tuple(parts), (rows, *parts[0][1][1:]))


def attention(m: ModelConfig, mx: str, hf: str) -> list[Link]:
    """Softmax attention ``{mx}.mixer`` ↔ ``{hf}.{q,k,v,o}_proj``."""
    q, kv, h = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.hidden_size
    return [Link.stack(f"{mx}.mixer.qkv_proj.weight", (f"{hf}.q_proj.weight", (q, h)),
                       (f"{hf}.k_proj.weight", (kv, h)), (f"{hf}.v_proj.weight", (kv, h))),
            Link.stack(f"{mx}.mixer.out_proj.weight", (f"{hf}.o_proj.weight", (h, q)))]


def gated_mlp(mx: str, hf: str, hidden: int, ffn: int, gate: str, up: str, down: str) -> list[Link]:
    """A SwiGLU ``{mx}`` (``gate_up_proj``, ``down_proj``) ↔ the HF linears ``{hf}.{gate,up,down}.weight``."""
    return [Link.stack(f"{mx}.gate_up_proj.weight", (f"{hf}.{gate}.weight", (ffn, hidden)),
                       (f"{hf}.{up}.weight", (ffn, hidden))),
            Link.stack(f"{mx}.down_proj.weight", (f"{hf}.{down}.weight", (hidden, ffn)))]


def relu2_mlp(mx: str, hf: str, hidden: int, ffn: int) -> list[Link]:
    """A squared-ReLU MLP ``{mx}`` (``up_proj``, ``down_proj``) ↔ the HF linears ``{hf}.{up,down}_proj.weight``."""
    return [Link.stack(f"{mx}.up_proj.weight", (f"{hf}.up_proj.weight", (ffn, hidden))),
            Link.stack(f"{mx}.down_proj.weight", (f"{hf}.down_proj.weight", (hidden, ffn)))]


def nemotron_h_mlp(m: ModelConfig, mx: str, hf: str) -> list[Link]:
    """Nemotron-H's squared-ReLU MLP ``{mx}.mixer`` ↔ ``{hf}.{up,down}_proj``."""
    return relu2_mlp(f"{mx}.mixer", hf, m.hidden_size, m.ffn_hidden_size)


def _router(mx: str, hf_weight: str, m: ModelConfig) -> Link:
    return Link.stack(f"{mx}.mixer.router.weight", (hf_weight, (m.moe.num_experts, m.hidden_size)))


def mixtral_moe(m: ModelConfig, mx: str, hf: str) -> list[Link]:
    """Softmax-routed SwiGLU experts ``{mx}.mixer`` ↔ Mixtral's ``{hf}.gate`` and ``{hf}.experts.<e>.w1/w3/w2``
    (gate, up, down). The selection bias has no Mixtral counterpart."""
    e, h = m.moe.num_experts, m.hidden_size
    links = [_router(mx, f"{hf}.gate.weight", m)]
    for j in range(e):
        links += gated_mlp(f"{mx}.mixer.experts.{j}", f"{hf}.experts.{j}", h, m.moe.ffn_hidden_size, "w1", "w3", "w2")
    return [*links, Link(f"{mx}.mixer.expert_bias", (), (e,))]


def nemotron_h_moe(m: ModelConfig, mx: str, hf: str) -> list[Link]:
    """Sigmoid-routed squared-ReLU experts ``{mx}.mixer`` ↔ Nemotron-H's ``{hf}.gate`` (weight and the selection
    bias ``e_score_correction_bias``), ``{hf}.experts.<e>.{up,down}_proj`` and ``{hf}.shared_experts``."""
    moe, h = m.moe, m.hidden_size
    links = [_router(mx, f"{hf}.gate.weight", m),
             Link.stack(f"{mx}.mixer.expert_bias", (f"{hf}.gate.e_score_correction_bias", (moe.num_experts,)))]
    for j in range(moe.num_experts):
        links += relu2_mlp(f"{mx}.mixer.experts.{j}", f"{hf}.experts.{j}", h, moe.ffn_hidden_size)
    return [*links, *relu2_mlp(f"{mx}.mixer.shared_experts", f"{hf}.shared_experts", h, moe.shared_width)]


def mamba2(m: ModelConfig, mx: str, hf: str) -> list[Link]:
    """A Mamba-2 mixer ``{mx}.mixer`` ↔ ``{hf}`` (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj)."""
    mb, h = m.mamba, m.hidden_size
    conv = mb.d_inner + 2 * mb.num_groups * mb.state_size
    shapes = {"in_proj.weight": (mb.d_inner + conv + mb.num_heads, h), "conv1d.weight": (conv, 1, mb.conv_kernel),
              "conv1d.bias": (conv,), "dt_bias": (mb.num_heads,), "A_log": (mb.num_heads,), "D": (mb.num_heads,),
              "norm.weight": (mb.d_inner,), "out_proj.weight": (h, mb.d_inner)}
    return [Link.stack(f"{mx}.mixer.{name}", (f"{hf}.{name}", shape)) for name, shape in shapes.items()]
