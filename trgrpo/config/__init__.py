"""The configuration: the schema Hydra composes into (`schema`), every problem a config can have
(`validation`), the dry run (`plan`, `plan_weights`) and the checks a resume makes (`resume`)."""
