"""Evaluation: yardsticks for the actor (verifiable instructions, win rates by an independent judge, the
promotion gate) that never use the policy as their judge, and the `eval` commands."""
