"""The FLOP model of one PPO iteration, per phase, for each contender (see benchmarks/README.md).

Only weight matmuls count (attention scores, softmax, norms and the optimizer are left out: under 2% here).
A weight matrix of p parameters costs, per token row:
  2p   in a forward pass,
  6p   in a forward and backward pass of a trained matrix (input gradient 2p + weight gradient 2p),
  4p   in a forward and backward pass of a frozen matrix that the backward still crosses (input gradient only),
  2p   for a frozen matrix below every trained one (no backward reaches it).
The FLOPs are those each implementation executes: rto shares the frozen bottom layers between its roles
(computed once per scoring chunk, reused by the update), TRL runs every model's full stack.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("ours_rto", "ours_ppo", "trl_ppo")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    @property
    def layer_params(self) -> int:
        """Weight-matrix parameters of one decoder layer: q, o (h x h), k, v (h x kv_heads*head_dim), the
        gated MLP's gate, up and down (3 h x intermediate)."""
        kv = self.kv_heads * self.hidden // self.heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        """The LM head (h x vocab; tied to the embeddings in SmolLM2, which cost no FLOPs as a lookup)."""
        return self.hidden * self.vocab


def weight_matrices(s: ModelShape) -> list[tuple[int, int]]:
    """(out, in) of every weight matrix a token row goes through, layer by layer, then the LM head."""
    kv = s.kv_heads * s.hidden // s.heads
    layer = [(s.hidden, s.hidden), (kv, s.hidden), (kv, s.hidden), (s.hidden, s.hidden),
             (s.intermediate, s.hidden), (s.intermediate, s.hidden), (s.hidden, s.intermediate)]
    return layer * s.layers + [(s.vocab, s.hidden)]


SMOLLM2_135M = ModelShape(hidden=576, intermediate=1536, layers=30, vocab=49152, heads=9, kv_heads=3)


def generation_flops(s: ModelShape, rollout: int, prompt: float, response: int) -> float:
    """Sampling `response` tokens after a `prompt`-token prompt, with a KV cache: prompt + response - 1 positions
    pass through every layer; the LM head runs at the `response` positions that sample a token."""
    return 2.0 * rollout * (s.layer_params * s.layers * (prompt + response - 1) + s.head_params * response)


def phase_flops(kind: str, s: ModelShape, rollout: int, prompt: float, response: int, train_layers: int | None,
                ppo_epochs: int = 1, policy_rescored: bool = False, trunk_from_sampler: bool = False
                ) -> dict[str, float]:
    """FLOPs of the generate, score and update phases of one iteration of `kind` (see KINDS).

    rollout responses of `response` tokens after prompts of mean length `prompt`; `train_layers` top layers
    train (None: all, embeddings and the tied LM head included). Scoring roles: rto RTO reads reference and
    DPO model (LM head on response positions) and reward model and critic (scalar heads), and the policy
    too when `policy_rescored` (rto before its sampler's log-probs were reused, or --rescore_policy); rto
    sparse PPO the same without the DPO model; TRL the reference (LM head on every position; the policy's
    log-probs come from the sampler's logits), the value model and the reward model. The update trains
    policy and critic on every position of the rollout, ppo_epochs times. With `trunk_from_sampler` (rto since
    the sampler keeps the shared trunk's states) scoring runs no trunk, and generation runs the frozen bottom
    once more for each response's last token.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    L, pl, ph = s.layers, s.layer_params, s.head_params
    k = L if train_layers is None or train_layers >= L else train_layers
    seq = rollout * (prompt + response)  # token rows of the whole rollout
    resp = rollout * response
    head_coef = 6.0 if k == L else 4.0  # the tied LM head trains only with the embeddings (all layers)
    generate = generation_flops(s, rollout, prompt, response)
    if kind.startswith("ours"):
        shared = L - k  # the frozen bottom, computed once for every role and kept for the update
        lm_roles = (2 if kind == "ours_rto" else 1) + policy_rescored
        trunk = 0 if trunk_from_sampler else shared
        generate += 2.0 * pl * rollout * shared if trunk_from_sampler else 0.0
        score = 2.0 * pl * seq * (trunk + k * (lm_roles + 2)) + 2.0 * ph * resp * lm_roles
        update = 2 * 6.0 * pl * seq * k + head_coef * ph * resp
    else:
        score = 2.0 * pl * seq * L * 3 + 2.0 * ph * seq
        update = 2 * (2.0 * pl * seq * (L - k) + 6.0 * pl * seq * k) + head_coef * ph * seq
    return {"generate": generate, "score": score, "update": update * ppo_epochs}


def mfu(flops: dict[str, float], seconds: dict[str, float], peak_gflops: float) -> dict[str, float]:
    """Model-FLOPs utilisation per phase: flops / seconds / peak (peak in GFLOP/s); phases without a time skipped."""
    return {p: flops[p] / seconds[p] / (peak_gflops * 1e9) for p in flops if seconds.get(p)}
