"""The CLI's choices are the API's: every value PruneConfig accepts for a field is a choice of its flag,
and no flag offers a value PruneConfig refuses."""
from __future__ import annotations

import argparse

import pytest

from woodfisher.cli import _subparser, build_parser, parse_args
from woodfisher.config import BACKENDS, FORMS, MODES, SCHEDULES, PruneConfig
from woodfisher.methods import METHODS

ACCEPTED = {"mode": MODES, "step_schedule": SCHEDULES, "backend": BACKENDS, "inverse_form": FORMS,
            "method": tuple(METHODS)}


def _choice_actions(command):
    sub = _subparser(build_parser(), command)
    return {a.dest: a for a in sub._actions if a.choices is not None and not isinstance(a, argparse._HelpAction)}


@pytest.mark.parametrize("command", ["prune", "pai"])
def test_every_choice_flag_of_a_config_field_offers_exactly_what_the_config_accepts(command):
    actions = _choice_actions(command)
    for dest, action in actions.items():
        if dest not in ACCEPTED:
            continue
        assert tuple(action.choices) == ACCEPTED[dest], dest
    if command == "prune":
        assert set(ACCEPTED) <= set(actions)


@pytest.mark.parametrize("field", sorted(ACCEPTED))
def test_each_choice_parses_and_builds_a_config(field):
    for value in ACCEPTED[field]:
        flag = "--" + field.replace("_", "-")
        args = parse_args(["prune", "--model", "digits_mlp", "--sparsity", "0.5", flag, value])
        assert getattr(args, field) == value
        extra = {"memory_budget": 1 << 20} if value == "offload" else {}
        assert getattr(PruneConfig(sparsity=0.5, **{field: value}, **extra), field) == value
