"""SFT with a loss weight per sample (filter.category_weights: the seed's learning-zone Weight column).

Each example carries ``weight``; the trainer keeps that column through TRL's dataset preparation
and the collator, and scales every token loss of a sample by the sample's weight. The batch loss
keeps TRL's normalization (the sum over the completion tokens of all samples, divided by the
number of those tokens in the optimizer step, across gradient accumulation and processes):

    loss = sum_i w_i * sum_t nll_it / sum_i n_i

so weights of 1.0 give exactly the unweighted loss, a sample of weight 0 adds nothing to the
gradient (its tokens still count in the denominator), and doubling a sample's weight doubles its
share of the gradient whatever else is in the batch. The weights are not renormalized: their
mean scales the step size as a learning-rate factor would.

Imported by the training job inside its work: TRL and transformers take seconds to import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from trl import SFTTrainer

WEIGHT = "weight"


class WeightedCollator:
    """The trainer's collator, with the batch's weights added as a tensor."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # TRL's collator reads the keys it knows and leaves the weight alone.
        return {**self.collate(examples), WEIGHT: torch.tensor([float(example[WEIGHT]) for example in examples])}


class WeightedSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose loss scales each sample's token losses by the sample's ``weight``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.padding_free or self.args.packing:
            # Both put several samples in one row, where a weight per row is no weight per sample.
            raise ValueError("per-sample loss weights need padding_free and packing off")
        self.data_collator = WeightedCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        # The dataset's columns the model's forward does not take are dropped before batching;
        # the weights must reach the collator.
        super()._set_signature_columns_if_needed()
        if WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        weights = inputs.pop(WEIGHT)

        def scale(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
            # TRL's loss (and only its loss) is built from the fused LM head's per-token log-probabilities.
            output.log_probs = output.log_probs * weights.to(output.log_probs)[:, None]
            return output

        hook = self.accelerator.unwrap_model(model).register_forward_hook(scale, with_kwargs=True)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
