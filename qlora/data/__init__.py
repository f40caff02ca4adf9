"""Data: sources -> checked records -> examples (token ids with loss masks, or class labels) -> the prepared-data
cache every process memory-maps.

- sources.py: data.path / eval_path as files, folders of shards, save_to_disk folders, cloud URIs, hub ids
- records.py: what every record of a format must hold (checked before tokenizing)
- formats.py, classification.py: the generation and classification formats (rendering, masking, truncation)
- splits.py: held-out split, k-fold, nested seeded subsets
- batches.py: padding, packing, length-grouped order (pure)
- examples.py: the stages both executors share (selection, encoding, the whole-set index)
- prepare.py: preparation in this process (small sources; the reference for the Ray Data pipeline)
- ray_pipeline.py: preparation as a Ray Data pipeline on the cluster
- cache.py: the content-addressed cache of prepared examples (Arrow shards, index, manifest)
- pipeline.py: plan + prepare, the entry the drivers use; open_prepared, the one the workers use
"""
from qlora.data.batches import (IGNORE, batched, collate, collate_packed, length_grouped_order, pack_examples,
                                pack_plan, packed_row, padding_efficiency, to_tensors)
from qlora.data.formats import (Encoder, answer_letter, as_alpaca, build_example, cap_segments, choice_prompt,
                                detect_format, render_segments, to_messages)
from qlora.data.examples import PreparedData
from qlora.data.prepare import prepare_in_memory, sample_segments
from qlora.data.splits import kfold_indices, nested_subset, split_indices

__all__ = ["IGNORE", "batched", "to_tensors", "collate", "collate_packed", "length_grouped_order", "pack_examples",
           "pack_plan", "packed_row", "padding_efficiency", "Encoder", "answer_letter", "as_alpaca", "build_example",
           "cap_segments", "choice_prompt", "detect_format", "render_segments", "to_messages", "PreparedData",
           "prepare_in_memory", "sample_segments", "kfold_indices", "nested_subset", "split_indices"]
