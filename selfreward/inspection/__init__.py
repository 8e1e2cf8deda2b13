"""Inspection tools over a run store: audit, status and show, the HTML report, browse, export, evals."""
