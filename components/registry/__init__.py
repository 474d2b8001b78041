"""The MLflow model registry and the served model.

    client.py      the registry client, connection retries, alias and model names, version
                   look-ups
    lock.py        one promote at a time: the promotion lock kept in the registry
    model_card.py  a version's lineage tags and its model card (description)
    pyfunc.py      logging the serving model into a run; loading it back
    serving.py     the served model itself: an mlflow.pyfunc PythonModel, logged as code
    scoring_app.py what `skinlesion serve` runs: MLflow's scoring server behind a guard
    request.py     what the guard and the served model share about one request

register, promote, predict and evaluate share these; nothing here imports a step.
"""
