"""Data pipeline: sources -> tokenize -> batching.

The batch contract every model, step and evaluator relies on (numpy arrays, one host's rows):

  input_ids       int32 [R, L]  token ids; pad id where segment_ids == 0
  token_type_ids  int32 [R, L]  0 for the first text (with its special tokens), 1 for the second
  segment_ids     int32 [R, L]  0 = padding, k >= 1 = the k-th example packed in this row
  position_ids    int32 [R, L]  position inside the token's own example, restarting at 0 per segment
  cls_index       int32 [R, S]  index in the row of each example's first token (0 for empty slots)
  labels          int32 [R, S]  class id (float32 for regression); 0 for empty slots
  example_mask    float32 [R, S]  1.0 for a real example, 0.0 for an empty slot
  example_ids     int32 [R, S]  index of the example in its dataset, -1 for empty slots

Unpacked batches are the S = 1 case (one example per row, segment id 1 on its tokens).
"""
