"""The lessons' experiments: models trained over seeds and recipes, measured side by side.

    workers      run_in_workers(): independent jobs (seeds, models) in one-thread worker processes
    ensembles    train_ensemble(), average_probs(), brier_decomposition(): second opinions (lesson 02)
    specialists  train_specialists(), oracle_logits(): one doctor per specialty (lessons 02-04)
    approaches   four_approaches(): the essay's four approaches measured side by side over seeds (lesson 04)
    balance      run_clinic_moes(), capacity_sweep(): ClinicMoEs over recipes, seeds and capacities (lesson 05)
    playground   train_clinic_moe(), clinic_day(): lesson 05's playground, computed
    lm_runs      run_lms(), results_table(), summarise(): dense and Switch language models over seeds (lesson 08)
    phonebook    the phone book: records to memorise, a rule to learn; dense vs Switch over seeds (lesson 08)
    modern_phonebook  run_phone_book_moes(): any MoEConfig (top-2, fine-grained, shared) on the phone book; upcycling (lesson 10)
    modern_balance    run_balance(): the clinic balanced by a loss or a bias, per batch or per micro-batch (lesson 10)

Import from the module (``from moe_course.experiments.approaches import four_approaches``):
this file imports nothing, so that a worker process loads only the module its job needs.
"""
