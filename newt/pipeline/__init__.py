"""The stages of a step: gather, measure, decide, record (each mode runs them in its order)."""
