"""Yardsticks for the actor: measures of the policy that do not use the policy as their judge."""
