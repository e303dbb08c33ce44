"""stage.preference.* settings: each wrong value named by its key with what is allowed; a loss refuses them."""
import pytest
import torch

from ov_train.model.preference import PairLogps, PreferenceSettings, preference_loss


def test_defaults_are_llava_nexts_dpo_script_and_valid():
    settings = PreferenceSettings()
    assert (settings.loss, settings.beta, settings.label_smoothing) == ("sigmoid", 0.1, 0.0)
    assert settings.problems() == []


@pytest.mark.parametrize("values, message", [
    ({"loss": "kto"}, "stage.preference.loss='kto'; allowed: ['sigmoid', 'ipo', 'hinge', 'sigmoid_sft']"),
    ({"beta": 0.0}, "stage.preference.beta=0.0 must be positive"),
    ({"label_smoothing": 0.5}, "stage.preference.label_smoothing=0.5 must be in [0, 0.5)"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "applies to loss ['sigmoid', 'sigmoid_sft'] only, not 'ipo'"),
    ({"loss": "sigmoid_sft", "sft_weight": 0.0}, "stage.preference.sft_weight=0.0 must be positive"),
])
def test_bad_values_are_named_by_key(values, message):
    problems = PreferenceSettings(**values).problems()
    assert len(problems) == 1 and message in problems[0]
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="stage.preference"):
        preference_loss(PreferenceSettings(**values), PairLogps(one, one), PairLogps(one, one), one + 1, one + 1)
