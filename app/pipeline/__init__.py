"""What a worker does with a job: start it, build its inputs once, unlearn or retrain,
fan shards out, verify the candidate, conclude.

Public seams (each a module):
- `start`: claim a job and its model's lock (`begin`), the device (`device`).
- `inputs`: `JobInputs`, built once per job (`build`), passed through to verification.
- `training`: a model's first version. `unlearning`: records. `features`: a feature
  removal. `retraining`: a fallback or mitigation retrain. `fanout`: SISA shards as a
  Celery chord. `verify`: every check on a candidate. `conclude`: version, report,
  decision; `fail_job`.
- `outcome`: the pipeline never changes a request's status; it reports to a
  `RequestEvents` (`app.requests.lifecycle.EVENTS`, passed in by the worker's task).
- `spec`: `ModelSpec` and `UnlearningConfig`, a model's stored body parsed once.
- `methods`: engine glue for monolithic models, feature removal and retraining.
"""
