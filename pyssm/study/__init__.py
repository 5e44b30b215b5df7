"""The controlled encoder study: pretrain each encoder on the scene generator with a matched
budget, freeze it, train the same VLM on top, evaluate VQA and grounding over seeds."""

from pyssm.study.budgets import BUDGETS, Budget
from pyssm.study.run import run_study

__all__ = ["BUDGETS", "Budget", "run_study"]
