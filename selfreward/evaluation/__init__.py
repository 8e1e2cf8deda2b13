"""Measuring the actor: yardsticks the loop never trains on."""
