"""Decoder-only transformer of the study: pre-LayerNorm, RoPE, GELU MLP, no biases, LayerNorm
with a gain and no bias, optional QK-LayerNorm, untied output layer, OLMo's `mitchell` init, z-loss."""

import functools
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Role = Literal["embedding", "matrix", "norm", "last_layer"]
ROLES: tuple[Role, ...] = ("embedding", "matrix", "norm", "last_layer")
"""What routing selects parameters by (`routes[].roles`) and optimizers lay out blocks by."""
Kind = Literal["embedding", "qkv", "attn_out", "mlp_in", "mlp_out", "norm", "last_layer"]
KIND_ROLES: dict[Kind, Role] = {"embedding": "embedding", "qkv": "matrix", "attn_out": "matrix", "mlp_in": "matrix",
                                "mlp_out": "matrix", "norm": "norm", "last_layer": "last_layer"}
"""Each parameter kind's role: the kinds name the matrices apart, for diagnostics per kind."""
FUSED_PROJECTIONS: dict[Kind, int] = {"qkv": 3}
"""How many projections a weight of a kind fuses along dim 0 (Q, K and V); 1 for kinds not listed."""


@dataclass
class ModelConfig:
    """Architecture of the decoder-only LM. Presets: `ModelConfig.from_name("150m")`."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_embd: int = 1024
    """Model width d_model."""
    n_head: int = 16
    """Attention heads; n_embd must be divisible by it."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of n_embd."""
    vocab_size: int = 32100
    """Tokenizer vocabulary; the embedding is padded up to a multiple of `padded_vocab_multiple`."""
    padded_vocab_multiple: int = 128
    """Round the embedding rows up to a multiple of this (T5's 32100 -> 32128), for fast matmuls."""
    block_size: int = 512
    """Longest context the model accepts (RoPE tables are built for it)."""
    qk_norm: bool = True
    """LayerNorm on queries and keys (QK-LayerNorm), as in the study."""
    z_loss: float = 1e-4
    """Coefficient of the z-loss `z_loss * logsumexp(logits)**2`; 0 turns it off."""
    rope_base: float = 10000.0
    """RoPE frequency base."""
    norm_bias: bool = False
    """Give every LayerNorm a bias (the study's LayerNorms have a gain only)."""
    init: Literal["mitchell", "normal"] = "mitchell"
    """`mitchell` (the study's, OLMo's): truncated normal at +-3 sigma, sigma = 1/sqrt(fan_in), the
    out-projections of block l further divided by sqrt(2 (l + 1)). `normal` (GPT-2's): normal(0,
    init_std), the out-projections divided by sqrt(2 n_layer)."""
    init_std: float = 0.02
    """Standard deviation of the `normal` init (unused by `mitchell`)."""

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "n_head", "mlp_ratio", "vocab_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.init not in ("mitchell", "normal"):
            raise ValueError(f"model.init must be 'mitchell' or 'normal', got {self.init!r}")
        if self.z_loss < 0:
            raise ValueError(f"model.z_loss must be >= 0, got {self.z_loss}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.padded_vocab_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (`tiny`, `cpu`, `150m`, `300m`, `600m`, `1.2b`), with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; expected some of {sorted(known)}")
        return replace(PRESETS[name], **overrides)


# Sizes of the study (Zhao et al. 2024, "Deconstructing What Makes a Good Optimizer for Language
# Models", arXiv:2407.07972, on OLMo's code) on T5's 32100-token vocabulary. `cpu` is the CPU study's model
# for the embedded 8000-piece tokenizer (8100 tokens): its 4 blocks, not the embedding and the
# output layer, do most of the work. `tiny` runs tests in seconds.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(n_layer=2, n_embd=128, n_head=4, vocab_size=8100, block_size=128),
    "cpu": ModelConfig(n_layer=4, n_embd=256, n_head=4, vocab_size=8100, block_size=128),
    "150m": ModelConfig(n_layer=12, n_embd=1024, n_head=16),
    "300m": ModelConfig(n_layer=24, n_embd=1024, n_head=16),
    "600m": ModelConfig(n_layer=24, n_embd=1408, n_head=22),
    "1.2b": ModelConfig(n_layer=24, n_embd=2048, n_head=32),
}


def rope_tables(block_size: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotary position embeddings, shape (block_size, head_size // 2)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x (B, n_head, T, h) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def layer_norm(config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.n_embd, bias=config.norm_bias)


def init_matrix(weight: torch.Tensor, config: ModelConfig, fan_in: int, depth_scale: float) -> None:
    """Initialise one matrix: `mitchell` std 1/sqrt(fan_in) cut at 3 std, or `normal` init_std;
    `depth_scale` divides the std of the residual out-projections."""
    if config.init == "mitchell":
        std = 1 / math.sqrt(fan_in) / depth_scale
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    else:
        nn.init.normal_(weight, mean=0.0, std=config.init_std / depth_scale)


def float32_attention(x: torch.Tensor) -> bool:
    """Whether attention runs in float32 under bf16 autocast: on a CPU, where torch's flash
    attention is slower in bf16 than in float32 (backward 50 against 29 ms a layer at the `cpu`
    preset's 16 x 4 x 128 x 64) and RoPE computes in float32 anyway. GPUs keep bf16 attention."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        # Q, K and V fused along dim 0: Adalayer treats the three as separate blocks.
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.q_norm = layer_norm(config) if config.qk_norm else nn.Identity()
        self.k_norm = layer_norm(config) if config.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        fp32_attention = float32_attention(x)
        if fp32_attention:
            q, k, v = q.float(), k.float(), v.float()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        with torch.autocast("cpu", enabled=False) if fp32_attention else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = layer_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = layer_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The study's decoder-only LM. `forward(idx)` returns logits over the padded vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = layer_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        cos, sin = rope_tables(config.block_size, config.head_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        """Recompute each block's activations in backward instead of keeping them: memory for
        one block's activations at a time, for about one more forward pass of compute."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The embedding, QKV, MLP in-projection and output layer have fan-in n_embd; the residual
        out-projections (attention out, MLP out) are scaled down with depth. LayerNorms start at
        gain 1 (bias 0)."""
        c = self.config
        init_matrix(self.wte.weight, c, c.n_embd, 1.0)  # OLMo: the embedding's "fan_in" is d_model
        init_matrix(self.lm_head.weight, c, c.n_embd, 1.0)
        for layer, block in enumerate(self.blocks):
            depth = math.sqrt(2 * (layer + 1)) if c.init == "mitchell" else math.sqrt(2 * c.n_layer)
            for linear, scale in ((block.attn.qkv, 1.0), (block.attn.proj, depth),
                                  (block.mlp.fc, 1.0), (block.mlp.proj, depth)):
                init_matrix(linear.weight, c, linear.in_features, scale)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.wte(idx)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    def param_kinds(self) -> dict[str, Kind]:
        """The kind of every parameter by name, tagged by the module that holds it rather than by
        name patterns: the one place that routing (through `param_roles`) and diagnostics ask."""
        held_by: dict[nn.Module, Kind] = {self.wte: "embedding", self.lm_head: "last_layer"}
        for block in self.blocks:
            held_by.update({block.attn.qkv: "qkv", block.attn.proj: "attn_out", block.mlp.fc: "mlp_in",
                            block.mlp.proj: "mlp_out"})
        kinds: dict[str, Kind] = {}
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                if isinstance(module, nn.LayerNorm):
                    kinds[name] = "norm"
                elif module in held_by:
                    kinds[name] = held_by[module]
                else:
                    raise TypeError(f"parameter {name} of {type(module).__name__} has no kind")
        return kinds

    def param_roles(self) -> dict[str, Role]:
        """The role of every parameter by name (`KIND_ROLES` of its kind): what routing,
        weight-decay groups and block layouts select by."""
        return {name: KIND_ROLES[kind] for name, kind in self.param_kinds().items()}

    def fused_projections(self, name: str) -> int:
        """How many projections a weight fuses along dim 0 (3 for Q/K/V, else 1)."""
        return FUSED_PROJECTIONS.get(self.param_kinds()[name], 1)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12 * L * d * T for attention (PaLM)."""
        c = self.config
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len


_BLOCK_INDEX = re.compile(r"^blocks\.\d+\.")


def kind_of(name: str) -> Kind | None:
    """The kind of the parameter `name` of a GPT of any depth and options, for code that has a
    parameter's name but no model (the effective-lr figure, read from a run's logs); None where
    GPT has no such parameter. It is what `GPT.param_kinds` says of that parameter in block 0."""
    return _reference_kinds().get(_BLOCK_INDEX.sub("blocks.0.", name))


@functools.cache
def _reference_kinds() -> dict[str, Kind]:
    """`param_kinds` of a one-block GPT with every optional parameter, on the meta device (no memory)."""
    with torch.device("meta"):
        return GPT(ModelConfig.from_name("tiny", n_layer=1, qk_norm=True, norm_bias=True)).param_kinds()


class _LMLoss(torch.autograd.Function):
    """Cross-entropy and z-loss from one float32 log-softmax of the logits, with a hand-written
    backward: softmax * (1 + 2 z_loss lse) - onehot, scaled by the incoming gradients, in one
    exp pass over the saved log-probabilities. Autograd's graph of the same formula makes a dense
    zero-filled gradient per gather, a subtract and an exp per log-sum-exp, and an add to join
    them: on a CPU those passes over the (tokens, vocabulary) logits cost more than the output
    layer's matmul."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, z_loss: float):
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        index = targets.unsqueeze(1)
        logp_target = logp.gather(1, index).squeeze(1)
        # log-sum-exp = logit - log-probability, exactly, for any one class: the target's.
        lse = logits.gather(1, index).squeeze(1).float() - logp_target
        ctx.save_for_backward(logp, index, lse)
        ctx.z_loss, ctx.dtype = z_loss, logits.dtype
        return -logp_target.mean(), z_loss * lse.pow(2).mean()

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor):
        logp, index, lse = ctx.saved_tensors
        n = logp.size(0)
        row = (grad_ce + 2 * ctx.z_loss * grad_z * lse) / n
        grad = logp.exp().mul_(row.unsqueeze(1))
        grad.scatter_add_(1, index, (-grad_ce / n).expand(n, 1))
        return grad.to(ctx.dtype), None, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy and mean z-loss `z_loss * logsumexp(logits)**2` over tokens.

    One log-softmax serves both (`_LMLoss`): the logits are read once forward and the gradient
    written once backward. Computed in float32 from logits of any dtype: the logsumexp of bf16
    logits loses the precision z-loss relies on.
    """
    ce, z = _LMLoss.apply(logits.flatten(0, 1), targets.flatten(), z_loss)
    return ce, z
