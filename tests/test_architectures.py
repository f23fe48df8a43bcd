"""The shared frozen trunk on tiny random decoders of several architectures: the trunk plus each role's top
layers gives the model's own forward (sliding-window layers, Gemma3's local/global RoPE, Gemma2's soft-caps),
and `checked_trunk_layers` proves it per run or turns sharing off."""

import copy

import pytest
import torch
import transformers as tf

from rto import trunk as rto_trunk
from rto.models import ValueModel, set_trainable
from rto.trunk import checked_trunk_layers
from rto.sequences import collate, probe_batch, shared_trunk, token_logprobs, token_values

VOCAB, LAYERS, WINDOW = 97, 4, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
MIXED = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]  # no shift of it is itself

ARCHITECTURES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=WINDOW, layer_types=MIXED)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(
        **COMMON, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, layer_types=MIXED)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=WINDOW)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, sliding_window=WINDOW)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # pattern 2: layers sliding, full, sliding, full, so both kinds sit in the top and in the bottom
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2)),
}
MIXED_LAYER_KINDS = ("qwen2", "qwen3", "gemma2", "gemma3")  # where the top layers' settings differ by position
FROZEN = (1, 2, 3)


def make(arch: str, seed: int = 0):
    """A tiny random causal LM of `arch` in eval mode, with larger-than-default weights so layers matter."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


def batch():
    """Rows of different lengths (left padding), both longer than the sliding window."""
    prompts = [[11, 12, 13, 14, 15, 16, 17], [14, 15, 16]]
    return collate(prompts, [[21, 22, 23, 24, 25, 26, 27, 28, 29], [25, 26, 27, 3]], pad_id=0)


def own_logprobs(model, b):
    """log pi(y_t | s_t) from the model's own forward (logits at positions P-1 .. P+T-2), 0 off the mask."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    logp = torch.log_softmax(logits[:, b.prompt_width - 1 : -1].float(), -1)
    return logp.gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1) * b.response_mask


def critic_of(model, seed: int = 1) -> ValueModel:
    """A ValueModel on a copy of `model` (same trunk) with a random head."""
    critic = ValueModel(copy.deepcopy(model)).eval()
    torch.manual_seed(seed)
    torch.nn.init.normal_(critic.head.weight)
    torch.nn.init.normal_(critic.head.bias)
    return critic


def probe():
    return probe_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], pad_id=0, response_tokens=12)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trunk_path_equals_the_models_own_forward(arch):
    model, b = make(arch), batch()
    want = own_logprobs(model, b)
    assert torch.allclose(token_logprobs(model, b), want, atol=1e-5)
    for n in FROZEN:
        trunk = shared_trunk(model, b, n)
        got = token_logprobs(model, b, trunk, n)
        assert torch.allclose(got, want, atol=1e-5), f"{arch}, {n} frozen: {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trunk_values_equal_the_head_on_the_models_own_hidden_states(arch):
    model, b = make(arch), batch()
    critic = critic_of(model)
    want = critic(b.input_ids, b.attention_mask, b.position_ids)[:, b.prompt_width - 1 :]
    real = b.attention_mask[:, b.prompt_width - 1 :].bool()
    for n in FROZEN:
        got = token_values(critic, b, shared_trunk(model, b, n), n)  # the policy's trunk feeds the critic
        assert torch.allclose(got[real], want[real], atol=1e-4), f"{arch}, {n} frozen"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checked_trunk_layers_shares_the_frozen_bottom(arch):
    policy = make(arch)
    critic = critic_of(policy)
    notes = []
    for k in (3, 2, 1):  # trains k of 4 layers: 4 - k frozen
        for m in (policy, critic):
            set_trainable(m, k)
        assert checked_trunk_layers([policy, critic], k, probe(), notes.append) == LAYERS - k
    assert notes == []


def test_nothing_frozen_shares_nothing_without_a_note():
    model, notes = make("llama"), []
    assert checked_trunk_layers([model], None, probe(), notes.append) == 0
    assert checked_trunk_layers([model], LAYERS, probe(), notes.append) == 0
    assert notes == []


def test_views_leave_the_models_config_as_it_was():
    model = make("gemma3")
    before = model.config.to_dict()
    b = batch()
    token_logprobs(model, b, shared_trunk(model, b, 1), 1)
    assert model.config.to_dict() == before


@pytest.mark.parametrize("arch", MIXED_LAYER_KINDS)
def test_a_view_that_disagrees_turns_sharing_off_with_a_note(arch, monkeypatch):
    # a view that keeps the whole model's per-layer settings (as views did before they were cut to their layers)
    monkeypatch.setattr(rto_trunk, "_layers_config", lambda config, start, stop: config)
    model, notes = make(arch), []
    assert checked_trunk_layers([model, critic_of(model)], 3, probe(), notes.append) == 0  # 1 frozen
    assert len(notes) == 1 and "\n" not in notes[0]
    assert type(model).__name__ in notes[0] and "differ from its own forward by up to" in notes[0]


def test_a_small_difference_is_within_tolerance_and_a_large_one_is_not(monkeypatch):
    model, notes = make("llama"), []
    monkeypatch.setattr(rto_trunk, "trunk_mismatch", lambda *a: 0.5 * rto_trunk.TRUNK_TOLERANCE)
    assert checked_trunk_layers([model], 2, probe(), notes.append) == 2
    monkeypatch.setattr(rto_trunk, "trunk_mismatch", lambda *a: 2 * rto_trunk.TRUNK_TOLERANCE)
    assert checked_trunk_layers([model], 2, probe(), notes.append) == 0
    assert len(notes) == 1 and "LlamaForCausalLM" in notes[0]


def test_roles_with_different_bottom_layers_share_nothing():
    a, b, notes = make("qwen2"), make("qwen2"), []
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    assert checked_trunk_layers([a, b], 2, probe(), notes.append) == 0
    assert len(notes) == 1 and "bottom 2 layers" in notes[0]


def test_roles_with_different_configs_share_nothing():
    a, notes = make("qwen2"), []
    b = copy.deepcopy(a)
    b.config.rms_norm_eps = 1e-3  # same weights, a different computation
    assert checked_trunk_layers([a, b], 2, probe(), notes.append) == 0
    assert len(notes) == 1 and "rms_norm_eps" in notes[0]
    b.config.rms_norm_eps, b.config._name_or_path = a.config.rms_norm_eps, "elsewhere"  # a name alone is no difference
    assert checked_trunk_layers([a, b], 2, probe(), notes.append) == 2


def test_the_probe_keeps_training_modes_and_runs_without_dropout():
    model = make("llama")
    model.config.attention_dropout = 0.5
    model.train()
    model.model.layers[0].eval()
    notes = []
    assert checked_trunk_layers([model], 2, probe(), notes.append) == 2 and notes == []
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_probe_batch_layout():
    b = probe_batch([[5, 6, 7], [8], [9, 9]], pad_id=0, response_tokens=5)
    assert len(b) == 2 and b.prompt_width == 3
    assert b.input_ids.tolist() == [[5, 6, 7, 5, 6, 7, 5, 6], [0, 0, 8, 8, 8, 8, 8, 8]]
    assert b.response_mask.tolist() == [[1] * 5, [1] * 5]
    assert probe_batch([[4, 5]], pad_id=0, response_tokens=3).input_ids.tolist() == [[4, 5, 4, 5, 4]]


def test_shared_trunk_weights_are_held_once_and_compute_the_same():
    """share_trunk_weights points each role's frozen embeddings and bottom layers at the first role's tensors
    (a tied output layer follows its embeddings); nothing any role computes changes; a trunk tensor that
    requires gradients (an inference-only load) leaves every model its own copy."""
    tied = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, tie_word_embeddings=True)).eval()
    policy, ref, critic = tied, copy.deepcopy(tied), critic_of(tied)
    with torch.no_grad():  # the top layers differ between roles, as after training
        for p in critic.lm.model.layers[2:].parameters():
            p.add_(0.1)
    for m in (policy, critic):
        set_trainable(m, 2)
    ref.requires_grad_(False)
    b = batch()
    before = [token_logprobs(policy, b), token_logprobs(ref, b), token_values(critic, b)]
    trunk_bytes = sum(p.numel() * 4 for p in [*tied.model.embed_tokens.parameters(),
                                             *tied.model.layers[:2].parameters()])
    assert rto_trunk.share_trunk_weights([ref, policy, critic], 2) == 2 * trunk_bytes
    for m in (policy, critic):
        lm = m.lm if isinstance(m, ValueModel) else m
        assert lm.model.embed_tokens.weight is ref.model.embed_tokens.weight
        assert lm.lm_head.weight is ref.model.embed_tokens.weight  # still tied
        for mine, theirs in zip(lm.model.layers[:2].parameters(), ref.model.layers[:2].parameters()):
            assert mine is theirs
        assert all(a is not b for a, b in zip(lm.model.layers[2:].parameters(), ref.model.layers[2:].parameters()))
    after = [token_logprobs(policy, b), token_logprobs(ref, b), token_values(critic, b)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    one, other = make("llama").requires_grad_(False), make("llama").requires_grad_(False)
    other.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    assert rto_trunk.share_trunk_weights([one, other], 2) == 0
    assert all(a is not b for a, b in zip(one.parameters(), other.parameters()))
