"""Search for the best edit: the Optuna study and loop (:mod:`.study`), the edit space (:mod:`.edit_space`)
and how one trial is scored (:mod:`.trial`), the SOM paper's subset space (:mod:`.subsets`), where edit
directions come from (:mod:`.sources`), and SQLite/PostgreSQL storage (:mod:`.storage`)."""
