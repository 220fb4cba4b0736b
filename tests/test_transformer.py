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
    out = attention(h, None, offsets) - attention.out.bias
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
