"""The transformer rate model: protocol, symmetries, exact reproduction of the truth, gradients."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from hpcdyn.learning.likelihood import iter_segments, path_log_likelihood, segment_terms
from hpcdyn.physics.rates import ActiveRates, true_rate_model
from hpcdyn.simulation.drivers import simulate
from hpcdyn.physics.systems import ConfigurationError, make_system
from hpcdyn.learning.transformer import OFFSET_BIAS_SCALE, TransformerConfig, TransformerRates, relative_offsets

ACTIVE = make_system("active", {"L": 6, "N": 7, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})


def configurations(system, batch, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [system.initial_configuration(rng) for _ in range(batch)]
    return torch.as_tensor(np.stack([p for p, _ in pairs])), torch.as_tensor(np.stack([s for _, s in pairs])).long()


@pytest.mark.parametrize(
    "field, values",
    [
        ("n_heads", {"d_model": 30, "n_heads": 4}),
        ("mode", {"mode": 3}),
        ("n_classes", {"mode": 2, "n_classes": 0}),
        ("estimator", {"estimator": "reinforce"}),
        ("exclusion_mask", {"system": "fa", "exclusion_mask": True}),
        ("d_model", {"d_model": 0}),
        ("system", {"system": "ising"}),
        ("initial_offset_score", {"initial_offset_score": float("-inf")}),
    ],
)
def test_invalid_configuration_is_refused_by_name(field, values):
    with pytest.raises(ConfigurationError, match=f"^{field}:"):
        TransformerConfig(**values)


def test_unknown_field_in_a_stored_configuration_is_refused():
    with pytest.raises(ConfigurationError, match="dropout: unknown model parameter"):
        TransformerConfig.from_dict({"dropout": 0.1})


@pytest.mark.parametrize("mode", [1, 2])
def test_shapes_follow_the_protocol_for_any_number_of_tokens(mode):
    model = TransformerRates(TransformerConfig(lattice_size=6, mode=mode, n_classes=3))
    for n in (3, 20):
        system = dataclasses.replace(ACTIVE, N=n)
        positions, states = configurations(system, 4)
        assert model(positions, states).shape == (4, n, 6)
    fa = TransformerRates(TransformerConfig(system="fa", lattice_size=8, mode=mode))
    positions, states = configurations(make_system("fa", {"L": 8, "dim": 2}), 2)
    assert fa(positions, states).shape == (2, 64, 1)


@pytest.mark.parametrize("relative_bias", [False, True])
def test_outputs_follow_a_permutation_of_the_tokens(relative_bias):
    model = TransformerRates(TransformerConfig(lattice_size=6, n_layers=2, relative_bias=relative_bias)).double()
    for parameter in model.parameters():  # make every weight matter, the offset tables included
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    positions, states = configurations(ACTIVE, 3)
    order = torch.randperm(ACTIVE.N, generator=torch.Generator().manual_seed(1))
    direct = model(positions, states)
    permuted = model(positions[:, order], states[:, order])
    torch.testing.assert_close(permuted, direct[:, order], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relative_bias", [False, True])
def test_rotary_model_starts_translation_invariant_on_the_torus(relative_bias):
    model = TransformerRates(TransformerConfig(lattice_size=6, n_layers=2, relative_bias=relative_bias)).double()
    for parameter in model.parameters():  # make every weight matter
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    model.embed_x.weight.data.zero_()
    model.embed_y.weight.data.zero_()
    positions, states = configurations(ACTIVE, 2)
    shifted = (positions + torch.tensor([2, 5])) % 6
    torch.testing.assert_close(model(shifted, states), model(positions, states), rtol=1e-10, atol=1e-10)


def test_offset_table_lets_a_head_see_exactly_one_neighbour():
    """With a huge score at offset (+1, 0) and none elsewhere, a sink-less head attends to the
    token one site to the right and to nothing else: its output is that token's value."""
    config = TransformerConfig(lattice_size=6, d_model=4, n_heads=1, n_layers=1, rotary=False,
                               attention_sink=False, relative_bias=True)  # fmt: skip
    model = TransformerRates(config).double()
    attention = model.blocks[0].attention
    with torch.no_grad():
        attention.qkv.weight.zero_()
        attention.qkv.bias.zero_()
        attention.qkv.weight[8:12] = torch.eye(4, dtype=torch.float64)  # value = input
        attention.offset_bias.fill_(-50.0)
        attention.offset_bias[0, 1 * 6 + 0] = 50.0
    positions = torch.tensor([[[0, 0], [1, 0], [3, 2], [4, 2]]])
    h = torch.randn(1, 4, 4, dtype=torch.float64)
    offsets = relative_offsets(positions, 6)
    attended = torch.nn.functional.linear(h, attention.qkv.weight[8:12])
    out = attention(h, None, attention.score_mask(offsets)) - attention.out.bias
    expected = torch.nn.functional.linear(attended[:, [1, 0, 3, 2]], attention.out.weight)
    torch.testing.assert_close(out[:, [0, 2]], expected[:, [0, 2]])  # tokens with a right neighbour


def test_offset_scores_start_at_the_configured_score_below_the_sink():
    config = TransformerConfig(lattice_size=6, d_model=8, n_heads=2, n_layers=2, initial_offset_score=-8.0)
    model = TransformerRates(config)
    for block in model.blocks:
        torch.testing.assert_close(block.attention.offset_bias * OFFSET_BIAS_SCALE, torch.full((2, 36), -8.0))
        assert torch.equal(block.attention.sink_logit, torch.zeros(2))


def test_exclusion_mask_forbids_exactly_the_blocked_hops():
    model = TransformerRates(TransformerConfig(lattice_size=6, exclusion_mask=True))
    positions, states = configurations(ACTIVE, 3)
    blocked = ActiveRates(ACTIVE).move_types(positions, states) == ActiveRates.BLOCKED_HOP
    log_rates = model(positions, states)
    assert blocked.any()
    assert torch.equal(torch.isneginf(log_rates), blocked)


def set_to_true_rates(model: TransformerRates, system) -> None:
    """Weights with which the model reproduces the active model's rates (blocked hops by the mask).

    Every block adds zero (output projections zeroed), so the final features are the normalised
    state embedding v_o; a linear read-out then solves W v_o + b = target_o exactly for o = 0..3.
    """
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attention.out, block.feed_forward[2]):
                layer.weight.zero_()
                layer.bias.zero_()
        model.embed_state.weight.copy_(torch.eye(4, model.config.d_model, dtype=torch.float64) * 3)
        features = model.final_norm(model.embed_state.weight)  # [4, d]
        design = torch.cat([features, torch.ones(4, 1, dtype=torch.float64)], 1)  # [4, d + 1]
        logs = {"D": math.log(system.D), "plus": math.log(system.v_plus), "other": math.log(system.v_other)}
        if model.config.mode == 1:
            targets = torch.tensor(
                [[logs["D"], logs["D"]] + [logs["plus"] if d == o else logs["other"] for d in range(4)] for o in range(4)],
                dtype=torch.float64,
            )
            layer = model.head
        else:  # classes 0: rotation, 1: forward hop, 2: other hop; logits 20 apart
            targets = torch.zeros(4, 6, 3, dtype=torch.float64)
            for o in range(4):
                targets[o, :2, 0] = 20
                for d in range(4):
                    targets[o, 2 + d, 1 if d == o else 2] = 20
            targets = targets.reshape(4, -1)
            layer = model.classifier
            model.class_log_rates.copy_(torch.tensor([logs["D"], logs["plus"], logs["other"]], dtype=torch.float64))
        # minimum-norm exact solution of the 4 equations per output: design^T (design design^T)^-1 targets
        solution = design.T @ torch.linalg.solve(design @ design.T, targets)  # [d + 1, outputs]
        layer.weight.copy_(solution[:-1].T)
        layer.bias.copy_(solution[-1])


@pytest.mark.parametrize("mode", [1, 2])
def test_a_model_set_to_the_true_rates_has_exactly_the_true_likelihood(mode):
    system = make_system("active", {"L": 8, "N": 12, "D": 0.3, "v_plus": 4.0, "v_other": 0.8})
    config = TransformerConfig(lattice_size=8, d_model=8, n_heads=2, d_ff=16, mode=mode, n_classes=3, exclusion_mask=True)
    model = TransformerRates(config).double().eval()
    set_to_true_rates(model, system)
    events = simulate(system, 20.0, seed=3).events
    learned = path_log_likelihood(events, model, segment_events=500)
    true = path_log_likelihood(events, true_rate_model(system), segment_events=500)
    assert events.n_events > 1000
    assert learned.log_likelihood == pytest.approx(true.log_likelihood, rel=1e-12, abs=1e-9)


def test_likelihood_gradients_match_finite_differences_in_float64():
    system = make_system("active", {"L": 5, "N": 4, "D": 0.3, "v_plus": 2.0, "v_other": 0.5})
    events = simulate(system, 2.0, seed=1).events
    model = TransformerRates(TransformerConfig(lattice_size=5, d_model=8, n_heads=2, d_ff=8)).double()
    for parameter in model.parameters():
        parameter.data.add_(0.2 * torch.randn_like(parameter))
    segment = (
        torch.as_tensor(events.initial_positions),
        torch.as_tensor(events.initial_states).long(),
        torch.as_tensor(events.tokens[:40]),
        torch.as_tensor(events.moves[:40]),
        torch.as_tensor(events.dwell[:40]),
    )
    names = ["head.weight", "blocks.0.attention.qkv.weight", "embed_state.weight"]
    parameters = dict(model.named_parameters())
    inputs = tuple(parameters[name].detach().clone().requires_grad_(True) for name in names)

    def log_likelihood(*values):
        def rates(positions, states):
            return torch.func.functional_call(model, dict(zip(names, values)), (positions, states), strict=False)

        return segment_terms(rates, system, *segment).log_likelihood()

    assert torch.autograd.gradcheck(log_likelihood, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_straight_through_gives_the_classifier_gradients_and_hard_rates():
    model = TransformerRates(TransformerConfig(lattice_size=6, mode=2, n_classes=4)).double()
    positions, states = configurations(ACTIVE, 2)
    log_rates = model(positions, states)
    # forward pass is hard: every log-rate is exactly one of the class log-rates
    distances = (log_rates.unsqueeze(-1) - model.class_log_rates).abs().min(-1).values
    assert distances.max() == 0
    log_rates.exp().sum().backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.class_log_rates.grad.abs().sum() > 0


def test_gumbel_relaxation_is_soft_in_training_and_hard_in_evaluation():
    model = TransformerRates(TransformerConfig(lattice_size=6, mode=2, n_classes=4, estimator="gumbel")).double()
    positions, states = configurations(ACTIVE, 2)
    model.train()
    soft = model(positions, states)
    assert (soft.unsqueeze(-1) - model.class_log_rates).abs().min(-1).values.max() > 0
    model.eval()
    hard = model(positions, states)
    assert (hard.unsqueeze(-1) - model.class_log_rates).abs().min(-1).values.max() == 0


def test_expected_gradient_is_the_exact_gradient_of_the_expected_likelihood():
    """With expected_gradient the classifier's gradient is that of U averaged over independent class
    draws from the softmax (linear in the probabilities), and the class rates' gradient is that of U
    with the hard classes; the values stay those of the hard model."""
    system = make_system("active", {"L": 5, "N": 4, "D": 0.3, "v_plus": 2.0, "v_other": 0.5})
    events = simulate(system, 2.0, seed=1).events
    torch.manual_seed(0)
    model = TransformerRates(TransformerConfig(lattice_size=5, d_model=8, n_heads=2, d_ff=8, mode=2, n_classes=3)).double()
    for parameter in model.parameters():
        parameter.data.add_(0.3 * torch.randn_like(parameter))
    segment = next(iter_segments(events, 30))
    model.train()
    model.expected_gradient = True
    surrogate = segment_terms(model, system, *segment).log_likelihood()
    model.zero_grad()
    surrogate.backward()
    got = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}

    model.expected_gradient = False
    hard_value = segment_terms(model, system, *segment).log_likelihood()
    assert surrogate.item() == pytest.approx(hard_value.item(), rel=1e-12)

    # the reference, written out: every move draws its class k with probability p_k
    from hpcdyn.physics.replay import replay_segment

    positions, states = replay_segment(system, *segment[:2], segment[2], segment[3])
    logits = model.classifier(model.encode(positions.long(), states.long())).unflatten(-1, (model.n_moves, 3))
    probabilities = logits.softmax(-1)
    rates = model.class_log_rates
    index = torch.arange(len(segment[2]))
    taken = (probabilities[index, segment[2].long(), segment[3].long()] * rates).sum(-1)
    escape = (probabilities * rates.exp()).sum((-1, -2, -3))
    expected = (taken - segment[4].double() * escape[:-1]).sum()
    model.zero_grad()
    expected.backward()
    for name, parameter in model.named_parameters():
        if name != "class_log_rates" and name in got:
            torch.testing.assert_close(got[name], parameter.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert model.classifier.weight.grad.abs().sum() > 0

    # the class rates: the gradient of U with every move in its argmax class
    classes = probabilities.argmax(-1)
    model.zero_grad()
    hard_rates = model.class_log_rates[classes]
    hard = (hard_rates[index, segment[2].long(), segment[3].long()] - segment[4].double() * hard_rates.exp().sum((-1, -2))[:-1]).sum()
    hard.backward()
    torch.testing.assert_close(got["class_log_rates"], model.class_log_rates.grad, rtol=1e-9, atol=1e-12)


def test_a_compiled_model_scores_segments_through_its_compiled_forward():
    """torch.compile wraps the module: segment_terms must call the wrapper, not a method of the
    module inside it, or training with --compile would run uncompiled."""
    graphs = []

    def backend(graph, example_inputs):  # records what dynamo compiled, runs it as traced
        graphs.append(graph)
        return graph.forward

    events = simulate(ACTIVE, 2.0, seed=1).events
    segment = next(iter_segments(events, 20))
    model = TransformerRates(TransformerConfig(lattice_size=6, d_model=8, n_heads=2, d_ff=8, mode=2, n_classes=3))
    model.train()
    eager = segment_terms(model, ACTIVE, *segment).log_likelihood()
    compiled = torch.compile(model, backend=backend)
    assert segment_terms(compiled, ACTIVE, *segment).log_likelihood().item() == pytest.approx(eager.item(), rel=1e-5)
    assert graphs, "the compiled forward was not called"


def test_expected_gradient_keeps_the_exclusion_mask():
    model = TransformerRates(TransformerConfig(lattice_size=6, mode=2, n_classes=3, exclusion_mask=True)).double()
    positions, states = configurations(ACTIVE, 2)
    model.train()
    model.expected_gradient = True
    event, exposure = model.split_log_rates(positions, states)
    model.eval()
    reference = model(positions, states)
    torch.testing.assert_close(event, reference)
    torch.testing.assert_close(exposure, reference)
    assert torch.isinf(reference).any()


# ----------------------------------------------------------------------------- attention kernels
def reference_attention(attention, h, mask=None):
    """Multi-head attention written out (explicit softmax, unpadded q, k, v; the sink as one more
    key with score sink_logit): what the fused paths of SelfAttention must reproduce."""
    batch, tokens, width = h.shape
    heads = attention.n_heads
    q, k, v = attention.qkv(h).view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)  # [batch, heads, tokens, tokens]
    if attention.sink_logit is not None:
        sink = attention.sink_logit.view(1, heads, 1, 1).expand(batch, heads, tokens, 1)
        scores = torch.cat([scores, sink.to(scores.dtype)], -1)
        v = torch.cat([v, attention.sink_value.expand(batch, -1, -1, -1)], 2)
    if mask is not None:
        sink_column = attention.sink_logit is not None
        bias = mask[..., :-1] if sink_column else mask
        scores = scores + functional_pad_zero(bias, sink_column)  # the mask's sink column is the logit itself
    attended = scores.softmax(-1) @ v
    return attention.out(attended.transpose(1, 2).reshape(batch, tokens, width))


def functional_pad_zero(bias, sink_column):
    return torch.nn.functional.pad(bias, (0, 1)) if sink_column else bias


def perturbed(model, scale=0.3, seed=0):
    """Every weight moved at random (the offset scores to around 0), so every path of the model matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name.endswith("offset_bias"):
                parameter.copy_(noise * 0.1)  # scores of order 1: neighbours get weight
            else:
                parameter.add_(scale * noise)
    return model


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("relative_bias", [False, True])
def test_attention_matches_the_written_out_unpadded_attention(sink, relative_bias):
    """The fused paths (v padded to the q/k width without a mask; the head-major mask) give the
    attention written out, in float32 to 1e-5."""
    config = TransformerConfig(lattice_size=6, d_model=16, n_heads=4, n_layers=1, attention_sink=sink,
                               relative_bias=relative_bias, rotary=False)  # fmt: skip
    model = perturbed(TransformerRates(config))
    attention = model.blocks[0].attention
    positions, _ = configurations(ACTIVE, 3)
    h = torch.randn(3, ACTIVE.N, 16, generator=torch.Generator().manual_seed(2))
    mask = attention.score_mask(model.attention_index(positions, 6)) if relative_bias else None
    with torch.no_grad():
        torch.testing.assert_close(attention(h, None, mask), reference_attention(attention, h, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stencil", [None, "vn1"])
def test_attention_masks_updated_per_move_equal_masks_built_afresh(stencil):
    extra = {"attention_stencil": stencil, "rotary": False} if stencil else {}
    model = perturbed(TransformerRates(TransformerConfig(lattice_size=6, d_model=8, n_heads=2, **extra)))
    positions, states = configurations(ACTIVE, 4)
    masks = model.attention_masks(positions)
    rng = np.random.default_rng(3)
    for _ in range(20):  # one token per replica hops (overlaps allowed: the masks must not care)
        tokens = torch.as_tensor(rng.integers(0, ACTIVE.N, 4))
        steps = torch.as_tensor(rng.integers(-1, 2, (4, 2)))
        positions[torch.arange(4), tokens] = (positions[torch.arange(4), tokens] + steps) % 6
        masks.update(positions, tokens)
    fresh = model.attention_masks(positions)
    for layer in range(len(model.blocks)):
        assert torch.equal(masks.layer(layer), fresh.layer(layer))
    with torch.no_grad():
        assert torch.equal(model(positions, states, masks=masks), model(positions, states))


# ----------------------------------------------------------------------------- hard-local model
@pytest.mark.parametrize(
    "field, values",
    [
        ("attention_stencil", {"attention_stencil": "cross7", "rotary": False}),
        ("rotary", {"attention_stencil": "vn1"}),
        ("relative_bias", {"attention_stencil": "vn1", "rotary": False, "relative_bias": False}),
        ("lattice_size", {"attention_stencil": "block5", "rotary": False, "lattice_size": 4}),
    ],
)
def test_invalid_hard_local_configuration_is_refused_by_name(field, values):
    with pytest.raises(ConfigurationError, match=f"^{field}:"):
        TransformerConfig(**values)


@pytest.mark.parametrize(
    "stencil, layers, family",
    [("vn1", 1, "vn1"), ("vn1", 2, "diamond2"), ("block3", 1, "block3"), ("block3", 2, "block5"),
     ("diamond2", 1, "diamond2"), ("vn1", 0, "vn1"), ("vn1", 3, None), ("diamond2", 2, None)],
)  # fmt: skip
def test_key_family_is_the_smallest_covering_the_receptive_field(stencil, layers, family):
    config = TransformerConfig(attention_stencil=stencil, rotary=False, n_layers=layers)
    assert config.key_family == family
    assert TransformerConfig().key_family is None and TransformerConfig().receptive_field is None


def test_hard_local_model_has_no_absolute_position_tables_and_old_configurations_load():
    local = TransformerRates(TransformerConfig(lattice_size=6, attention_stencil="vn1", rotary=False))
    names = set(local.state_dict())
    assert not any(name.startswith(("embed_x", "embed_y")) for name in names)
    assert local.blocks[0].attention.offset_bias.shape == (4, 5)  # one score per head and stencil offset
    stored = TransformerConfig().as_dict()
    del stored["attention_stencil"]  # a checkpoint written before the field existed
    assert TransformerConfig.from_dict(stored) == TransformerConfig()


@pytest.mark.parametrize("offset_values", [False, True])
def test_offset_values_tell_a_head_where_a_neighbour_sits(offset_values):
    """One head, every offset scored alike: without offset values a neighbour at +x and one at -x read
    the same; with them the centre token's rates differ (a head reads where, not only what)."""
    config = TransformerConfig(lattice_size=8, d_model=8, n_heads=1, n_layers=1, d_ff=8, attention_stencil="vn1",
                               rotary=False, offset_values=offset_values, initial_offset_score=0.0)  # fmt: skip
    model = TransformerRates(config).double().eval()
    torch.nn.init.normal_(model.head.weight)
    states = torch.tensor([[0, 1]])
    with torch.no_grad():
        right = model(torch.tensor([[[4, 4], [5, 4]]]), states)[0, 0]
        left = model(torch.tensor([[[4, 4], [3, 4]]]), states)[0, 0]
    assert (right - left).abs().max() > 1e-3 if offset_values else torch.allclose(right, left, atol=1e-12)


def test_offset_values_are_on_for_hard_local_models_only_and_old_checkpoints_load_without():
    assert TransformerConfig(attention_stencil="vn1", rotary=False).offset_values is True
    assert TransformerConfig().offset_values is False
    with pytest.raises(ConfigurationError, match="^offset_values:"):
        TransformerConfig(offset_values=True)
    stored = TransformerConfig(attention_stencil="vn1", rotary=False).as_dict()
    del stored["offset_values"]  # a hard-local checkpoint written before offset values existed
    old = TransformerRates(TransformerConfig.from_dict(stored))
    assert old.config.offset_values is False and old.blocks[0].attention.offset_values is None
    # a partial configuration (a sweep's model.* keys) gets the default: on for a hard-local model
    assert TransformerConfig.from_dict({"attention_stencil": "vn1", "rotary": False}).offset_values is True


def hard_local_model(stencil, layers, mode, sink=True):
    config = TransformerConfig(lattice_size=12, d_model=16, n_heads=4, n_layers=layers, d_ff=16, mode=mode,
                               n_classes=3, attention_stencil=stencil, rotary=False, attention_sink=sink)  # fmt: skip
    return perturbed(TransformerRates(config).double(), seed=layers).eval()


def random_configuration(side, density, seed):
    rng = np.random.default_rng(seed)
    count = int(round(density * side * side))
    sites = rng.choice(side * side, count, replace=False)
    positions = np.stack([sites % side, sites // side], 1)
    return torch.as_tensor(positions), torch.as_tensor(rng.integers(0, 4, count))


def patches_alone(positions, states, side, field, new_side, centre):
    """For each token: its receptive-field patch (itself first) placed alone at centre of a new_side lattice."""
    offsets = (positions[None, :, :] - positions[:, None, :] + side // 2) % side - side // 2  # [i, j, 2] signed
    inside = torch.tensor([[tuple(offset) in field for offset in row.tolist()] for row in offsets])
    patches = []
    for token in range(len(states)):
        others = [j for j in torch.nonzero(inside[token]).flatten().tolist() if j != token]
        members = [token, *others]
        patches.append(((offsets[token, members] + torch.tensor(centre)) % new_side, states[members]))
    return patches


def evaluate_alone(model, patches, lattice_size):
    """Log-rates of each patch's first token, patches of equal size in one batch."""
    rows = [None] * len(patches)
    by_size = {}
    for index, (positions, _) in enumerate(patches):
        by_size.setdefault(len(positions), []).append(index)
    for indices in by_size.values():
        positions = torch.stack([patches[i][0] for i in indices])
        states = torch.stack([patches[i][1] for i in indices])
        with torch.no_grad():
            log_rates = model(positions, states, lattice_size=lattice_size)[:, 0]
        for row, index in zip(log_rates, indices):
            rows[index] = row
    return torch.stack(rows)


@pytest.mark.parametrize("density", [0.124, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("stencil, layers, mode", [("vn1", 2, 1), ("block3", 1, 2), ("vn1", 1, 1)])
def test_hard_local_rates_equal_those_of_the_receptive_field_alone(density, stencil, layers, mode):
    """Every token's log-rates in a full configuration equal those of its receptive-field patch
    placed alone on an empty lattice, of the same size (around a corner: the torus wraps) and of
    another size, to 1e-6."""
    model = hard_local_model(stencil, layers, mode)
    positions, states = random_configuration(12, density, seed=int(density * 1000))
    with torch.no_grad():
        full = model(positions[None], states[None])[0]
    field = model.config.receptive_field
    for side, centre in ((12, (0, 11)), (9, (4, 4)), (17, (8, 3))):
        alone = evaluate_alone(model, patches_alone(positions, states, 12, field, side, centre), side)
        torch.testing.assert_close(alone, full, rtol=0, atol=1e-6, msg=f"lattice {side}")
    if density == 0.7:  # the patches must be what matters: the isolated token's rates differ
        isolated = evaluate_alone(model, [(positions[:1], states[:1])], 12)
        assert (isolated[0] - full[0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", [1, 2])
def test_hard_local_model_is_translation_invariant(mode):
    model = hard_local_model("block3", 2, mode)
    positions, states = random_configuration(12, 0.3, seed=5)
    shifted = (positions + torch.tensor([5, 9])) % 12
    with torch.no_grad():
        torch.testing.assert_close(model(shifted[None], states[None]), model(positions[None], states[None]),
                                   rtol=0, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("sink", [False, True])
def test_a_token_with_no_neighbour_in_its_stencil_gets_finite_rates(sink):
    model = hard_local_model("vn1", 2, 1, sink=sink).float()
    positions = torch.tensor([[[0, 0], [5, 5], [5, 7]]])  # no pair within the stencil of each other
    log_rates = model(positions, torch.tensor([[0, 1, 2]]))
    assert torch.isfinite(log_rates).all()


def test_only_a_hard_local_model_runs_on_another_lattice():
    positions, states = configurations(ACTIVE, 1)
    with pytest.raises(ConfigurationError, match="^lattice_size:"):
        TransformerRates(TransformerConfig(lattice_size=6))(positions, states, lattice_size=8)
    local = TransformerRates(TransformerConfig(lattice_size=6, attention_stencil="vn1", rotary=False, exclusion_mask=True))
    log_rates = local(positions, states, lattice_size=8)
    other = make_system("active", {"L": 8, "N": ACTIVE.N})  # the exclusion mask follows the lattice too
    assert torch.equal(torch.isneginf(log_rates), ActiveRates(other).move_types(positions, states) == ActiveRates.BLOCKED_HOP)


# ----------------------------------------------------------------------------- one token alone
@pytest.mark.parametrize(
    "extra",
    [
        {"n_layers": 2},  # rotary, the relative bias over the torus, the sink
        {"n_layers": 2, "relative_bias": False, "attention_sink": False},
        {"attention_stencil": "vn1", "rotary": False, "n_layers": 1},
        {"attention_stencil": "block3", "rotary": False, "n_layers": 2, "exclusion_mask": True},
        {"attention_stencil": "vn1+count3", "rotary": False, "n_layers": 1, "exclusion_mask": True},
    ],
)
@pytest.mark.parametrize("mode", [1, 2])
def test_one_token_alone_has_the_rates_classes_and_gradients_of_the_whole_forward(extra, mode):
    """``token=t`` (training on statistics: the centre of each patch) skips the last layer's other
    tokens; what it returns, and the gradients of it, equal the whole forward's token t in float64."""
    config = TransformerConfig(lattice_size=6, d_model=8, n_heads=2, d_ff=16, mode=mode, n_classes=3, **extra)
    model = perturbed(TransformerRates(config).double())
    positions, states = configurations(ACTIVE, 4)
    with torch.no_grad():
        full = model(positions, states)
        assert torch.isfinite(full).any() and (not config.exclusion_mask or torch.isinf(full).any())
        for token in range(ACTIVE.N):
            torch.testing.assert_close(model(positions, states, token=token), full[:, token : token + 1], rtol=1e-12, atol=1e-12)
            if mode == 2:
                whole = model.move_classes(positions, states)[:, token : token + 1]
                assert torch.equal(model.move_classes(positions, states, token=token), whole)
    token = 3
    if mode == 2:
        model.expected_gradient = True  # the event and exposure log-rates apart, as on statistics
    parts = [model.split_log_rates(positions, states)[index][:, token] for index in range(2)]
    alone = [model.split_log_rates(positions, states, token=token)[index][:, 0] for index in range(2)]
    for whole, one in zip(parts, alone):
        weights = torch.linspace(-1.0, 1.0, whole.numel(), dtype=whole.dtype).view_as(whole)
        score_whole = torch.where(torch.isfinite(whole), whole * weights, 0.0).sum()
        score_one = torch.where(torch.isfinite(one), one * weights, 0.0).sum()
        grads_whole = torch.autograd.grad(score_whole, list(model.parameters()), allow_unused=True)
        grads_one = torch.autograd.grad(score_one, list(model.parameters()), allow_unused=True)
        for (name, _), a, b in zip(model.named_parameters(), grads_whole, grads_one):
            if a is None:
                assert b is None or not b.any(), name
            else:
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
