"""Editing math on top of sampling: consistency measures and consistency-guided sampling, edit
masks, compositing and face models."""
