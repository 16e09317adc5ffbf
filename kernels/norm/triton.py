"""Triton kernels of the norm family (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

The math is :class:`megamix_kernels.norm.torch_ops.NormFunction`'s. One forward and one backward
kernel serve RMSNorm, gated RMSNorm and SRMSNorm through two compile-time flags (HAS_GATE,
HAS_WEIGHT) and the group size (dim for the ungated norms). Inputs are viewed as ``[rows, dim]``;
a tile is BLOCK_ROWS rows × the BLOCK ≥ group_size channels of one group, loaded in the inputs'
dtype and computed in fp32.

- Forward: program (i, g) normalises rows [i·BLOCK_ROWS, (i+1)·BLOCK_ROWS) of group g and writes
  y and rstd ``[rows, groups]`` (fp32, kept for the backward).
- Backward: program (p, g) walks its own contiguous range of rows of group g tile by tile, writing
  dx (and dz) and summing g · û into a partial weight gradient ``[programs, dim]`` (fp32) that one
  ``sum(0)`` reduces; a few programs per SM, so the partials stay small next to x.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# One group's channels sit in one tile: 64 fp32 values per thread at 16 warps.
MAX_GROUP_SIZE = 32768
# Tiles of more elements than this spill registers on an H100 (several fp32 tiles are live at once).
MAX_TILE_ELEMENTS = 16384
BACKWARD_PROGRAMS_PER_SM = 4


def tile_configs() -> list[triton.Config]:
    """Rows per tile × warps; the interpreter takes one config (autotuning more needs a GPU driver)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_ROWS": 8}, num_warps=4)]
    return [triton.Config({"BLOCK_ROWS": rows}, num_warps=warps)
            for rows in (1, 2, 4, 8, 16, 32, 64) for warps in (2, 4, 8, 16)]


def prune_tile_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles of at most MAX_TILE_ELEMENTS (or one row) with 4 to 64 values per thread."""
    block = kwargs["BLOCK"]

    def fits(config: triton.Config) -> bool:
        tile = config.kwargs["BLOCK_ROWS"] * block
        return tile <= max(block, MAX_TILE_ELEMENTS) and 4 <= tile / (32 * config.num_warps) <= 64

    return [config for config in configs if fits(config)] or configs[:1]


def autotuned(kernel):
    """Autotune over :func:`tile_configs`, once per group size, flags and input dtypes."""
    return triton.autotune(configs=tile_configs(), key=["group_size", "HAS_GATE", "HAS_WEIGHT"],
                           prune_configs_by={"early_config_prune": prune_tile_configs})(kernel)


@triton.jit
def tile_offsets(first_row, last_row, rows, dim, group_size, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``[BLOCK_ROWS]`` from first_row, element offsets into ``[rows, dim]`` and the mask of the
    tile ``[BLOCK_ROWS, BLOCK]`` (rows before min(last_row, rows), channels of this program's group)."""
    row = first_row + tl.arange(0, BLOCK_ROWS)
    channel = tl.arange(0, BLOCK)
    column = tl.program_id(1) * group_size + channel
    offsets = row.to(tl.int64)[:, None] * dim + column[None, :]
    mask = ((row < last_row) & (row < rows))[:, None] & (channel < group_size)[None, :]
    return row, offsets, mask


@autotuned
@triton.jit
def norm_forward_kernel(x_ptr, z_ptr, weight_ptr, y_ptr, rstd_ptr, rows, dim, group_size, eps,
                        HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """y = x · silu(z) · rstd · w per group; x, z, y ``[rows, dim]``, w ``[dim]``, rstd ``[rows, groups]``."""
    group = tl.program_id(1)
    first_row = tl.program_id(0) * BLOCK_ROWS
    row, offsets, mask = tile_offsets(first_row, rows, rows, dim, group_size, BLOCK_ROWS, BLOCK)
    u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        u = u * z * tl.sigmoid(z)
    rstd = tl.rsqrt(tl.sum(u * u, axis=1) / group_size + eps)
    y = u * rstd[:, None]
    if HAS_WEIGHT:
        channel = tl.arange(0, BLOCK)
        weight = tl.load(weight_ptr + group * group_size + channel, mask=channel < group_size, other=0.0)
        y = y * weight.to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row * tl.num_programs(1) + group, rstd, mask=row < rows)


@autotuned
@triton.jit
def norm_backward_kernel(x_ptr, z_ptr, weight_ptr, rstd_ptr, grad_y_ptr, grad_x_ptr, grad_z_ptr,
                         grad_weight_partial_ptr, rows, dim, group_size, rows_per_program,
                         HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """dx, dz ``[rows, dim]`` and this program's partial dw (row ``program`` of ``[programs, dim]``)
    for its rows [program·rows_per_program, (program+1)·rows_per_program) of group g."""
    group = tl.program_id(1)
    program_first_row = tl.program_id(0) * rows_per_program
    program_last_row = program_first_row + rows_per_program
    channel = tl.arange(0, BLOCK)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + group * group_size + channel, mask=channel < group_size, other=0.0)
        weight = weight.to(tl.float32)
        grad_weight = tl.zeros([BLOCK], dtype=tl.float32)
    for tile_start in range(0, rows_per_program, BLOCK_ROWS):
        row, offsets, mask = tile_offsets(program_first_row + tile_start, program_last_row, rows, dim, group_size,
                                          BLOCK_ROWS, BLOCK)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            sigmoid_z = tl.sigmoid(z)
            u = x * z * sigmoid_z
        else:
            u = x
        rstd = tl.load(rstd_ptr + row * tl.num_programs(1) + group, mask=row < rows, other=0.0)
        u_hat = u * rstd[:, None]
        grad_y = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            grad_weight += tl.sum(grad_y * u_hat, axis=0)
            grad_u_hat = grad_y * weight[None, :]
        else:
            grad_u_hat = grad_y
        mean_dot = tl.sum(grad_u_hat * u_hat, axis=1) / group_size
        grad_u = (grad_u_hat - u_hat * mean_dot[:, None]) * rstd[:, None]
        if HAS_GATE:
            tl.store(grad_x_ptr + offsets, (grad_u * z * sigmoid_z).to(grad_x_ptr.dtype.element_ty), mask=mask)
            grad_z = grad_u * x * sigmoid_z * (1 + z * (1 - sigmoid_z))
            tl.store(grad_z_ptr + offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(grad_x_ptr + offsets, grad_u.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(grad_weight_partial_ptr + tl.program_id(0) * dim + group * group_size + channel, grad_weight,
                 mask=channel < group_size)


@functools.cache
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_row_programs(x: torch.Tensor, rows: int, groups: int) -> int:
    """Programs along the rows in the backward: a few per SM over all groups (4 in the interpreter)."""
    slots = BACKWARD_PROGRAMS_PER_SM * multiprocessor_count(x.device.index) if x.is_cuda else 4
    return max(1, min(rows, triton.cdiv(slots, groups)))


def as_rows(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """``[..., dim] → [rows, dim]``, contiguous (None stays None)."""
    return None if t is None else t.reshape(-1, dim).contiguous()


class TritonNormFunction(torch.autograd.Function):
    """:class:`~megamix_kernels.norm.torch_ops.NormFunction` with the Triton kernels; saves x, z, weight, rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                group_size: int) -> torch.Tensor:
        if group_size > MAX_GROUP_SIZE:
            raise ValueError(f"group size {group_size} exceeds the {MAX_GROUP_SIZE} channels one tile holds")
        dim = x.shape[-1]
        x_rows, z_rows = as_rows(x, dim), as_rows(z, dim)
        rows, groups = x_rows.shape[0], dim // group_size
        y = torch.empty_like(x_rows)
        rstd = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]), groups)
        norm_forward_kernel[grid](x_rows, z_rows, weight, y, rstd, rows, dim, group_size, eps,
                                  HAS_GATE=z is not None, HAS_WEIGHT=weight is not None,
                                  BLOCK=triton.next_power_of_2(group_size))
        ctx.save_for_backward(x_rows, z_rows, weight, rstd)
        ctx.group_size = group_size
        return y.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_rows, z_rows, weight, rstd = ctx.saved_tensors
        group_size = ctx.group_size
        rows, dim = x_rows.shape
        groups = rstd.shape[1]
        programs = backward_row_programs(x_rows, rows, groups)
        grad_x = torch.empty_like(x_rows)
        grad_z = None if z_rows is None else torch.empty_like(z_rows)
        grad_weight_partial = None if weight is None else torch.empty(programs, dim, dtype=torch.float32,
                                                                      device=x_rows.device)
        norm_backward_kernel[(programs, groups)](
            x_rows, z_rows, weight, rstd, as_rows(grad, dim), grad_x, grad_z, grad_weight_partial,
            rows, dim, group_size, triton.cdiv(rows, programs),
            HAS_GATE=z_rows is not None, HAS_WEIGHT=weight is not None, BLOCK=triton.next_power_of_2(group_size))
        grad_weight = None if weight is None else grad_weight_partial.sum(0).to(weight.dtype)
        shape = grad.shape
        return (grad_x.view(shape), None if grad_z is None else grad_z.view(shape), grad_weight, None, None)


def triton_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                group_size: int) -> torch.Tensor:
    """The norm family with the Triton kernels (z, weight optional), ``x [..., dim] → [..., dim]``."""
    return TritonNormFunction.apply(x, z, weight, eps, group_size)
