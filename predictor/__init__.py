"""predictor: what reads a finished run. Sharded inference gathered on rank 0 into submission.csv
(predict, with the MXNet or the onnxruntime engine) and the scoring of a submission (score)."""
