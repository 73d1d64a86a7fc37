"""A compiled decode step called again with the same argument objects replays its last call (runtime.Replay): the
graph dynamo chose then, with the inputs dynamo gathered then, without dynamo's frame evaluation, guards and input
gathering. The reference is the same step through dynamo (the replay released before each call): bitwise equal
results; and eager for the values. Anything dynamo would have to look at again goes through dynamo again."""

import torch

from moekit import ModelConfig, Transformer
from moekit.runtime import compiled_step

B, S = 2, 64


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny")).eval()


def counting(step):
    """Wrap the step's dynamo-compiled function: the returned list grows by one per call that goes through dynamo."""
    calls, inner = [], step.fn

    def fn(*args):
        calls.append(1)
        return inner(*args)

    step.fn = fn
    return calls


def step_inputs(model):
    zeros = dict(dtype=torch.long)
    return (torch.zeros(B, 1, **zeros), torch.zeros(B, 1, **zeros), torch.zeros(B, **zeros),
            torch.ones(B, S, dtype=torch.bool), model.new_cache(B, S, torch.float32, torch.device("cpu")))


def feed(inputs, t: int, generator) -> None:
    tokens_B1, positions_B1, slots_B = inputs[:3]
    tokens_B1.copy_(torch.randint(0, 500, (B, 1), generator=generator))
    positions_B1.fill_(t)
    slots_B.fill_(t)


def test_a_step_fed_in_place_replays_and_equals_the_dynamo_call_bitwise():
    model = tiny()
    replayed, through_dynamo = compiled_step(model, "a", False), compiled_step(model, "b", False)
    with torch.inference_mode():
        replayed(*step_inputs(model))  # compiled (on other inputs)
        through_dynamo(*step_inputs(model))
    calls_a, calls_b = counting(replayed), counting(through_dynamo)
    a_inputs, b_inputs, eager = step_inputs(model), step_inputs(model), step_inputs(model)
    gen = [torch.Generator().manual_seed(1) for _ in range(3)]
    with torch.inference_mode():
        for t in range(6):
            for inputs, g in zip((a_inputs, b_inputs, eager), gen):
                feed(inputs, t, g)
            through_dynamo.release()
            got, want = replayed(*a_inputs), through_dynamo(*b_inputs)
            assert torch.equal(got, want)
            assert torch.allclose(got, model.decode_step(*eager), rtol=1e-4, atol=1e-4)
    assert len(calls_a) == 1 and len(calls_b) == 6  # a: the first call with these objects only


def test_other_objects_modes_or_model_state_go_through_dynamo_again():
    model = tiny()
    step = compiled_step(model, "c", False)
    inputs = step_inputs(model)
    with torch.inference_mode():
        step(*inputs)
        calls = counting(step)
        step(*inputs)
        assert calls == []
        step(inputs[0].clone(), *inputs[1:])  # another tensor object, the same values
        assert len(calls) == 1
        step(*inputs)  # (the replay now holds the clone: the original is another object again)
        assert len(calls) == 2
        step(*inputs)
        assert len(calls) == 2
    with torch.no_grad():  # out of inference mode: another mode
        step(*inputs)
    assert len(calls) == 3
    counted = step.fn
    model.train()  # a change of the model's state compiles again: never the replay of the eval graph
    with torch.inference_mode():
        step(*inputs)
    assert len(calls) == 3 and step.fn is not counted


def test_a_step_that_changes_an_outside_object_is_never_replayed():
    """The module attribute a step sets must be set by every call: such a step always goes through dynamo."""
    model = tiny()

    def marking_step(model, tokens_B1, positions_B1, slots_B, valid_BS, cache):
        model.marker = positions_B1.sum()
        return model.decode_step(tokens_B1, positions_B1, slots_B, valid_BS, cache)

    step = compiled_step(model, "d", False, marking_step)
    inputs = step_inputs(model)
    with torch.inference_mode():
        for t in range(3):
            inputs[1].fill_(t)
            step(*inputs)
            assert model.marker.item() == B * t
    assert step.replay is None


def test_the_replayed_result_keeps_its_structure_and_constants():
    """A step returning a tuple with a constant and an output that is one of its inputs' values."""
    model = tiny()

    def step_fn(model, tokens_B1, positions_B1, slots_B, valid_BS, cache):
        logits = model.decode_step(tokens_B1, positions_B1, slots_B, valid_BS, cache)
        return logits, None, {"argmax": logits.argmax(-1), "n": 3}

    step = compiled_step(model, "e", False, step_fn)
    inputs = step_inputs(model)
    with torch.inference_mode():
        first = step(*inputs)
        calls = counting(step)
        second = step(*inputs)
    assert calls == [] and step.replay is not None
    assert second[1] is None and second[2]["n"] == 3
    assert torch.equal(second[2]["argmax"], second[0].argmax(-1))
    assert second[0] is not first[0]  # a new output tensor each call
