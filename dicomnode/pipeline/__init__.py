"""From a received study to delivered results, along the flow: the facts of a study (`facts`),
which series fill a model's channels (`selection`), when a study is complete (`assembler`), the
job queue (`queue`), a job's inputs (`inputs`), the models (`model_cache`), one job start to end
(`job`), its deliveries (`delivery` keeps their state, `dispatch` sends them), the worker
process (`worker`), and how a job's work ends other than in success (`errors`)."""
