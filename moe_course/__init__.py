"""moe_course: the tested building blocks of the Mixture-of-Experts course.

Experts are doctors; the router is the GP who sends each patient to the right
specialist. Modules, in reading order:

    device     get_device(), seed_everything()
    clinic     make_clinic(): patients from several specialties (lessons 01-05)
    experts    FeedForward: one doctor, the transformer's MLP block; Experts: E doctors, stacked weights
    flops      count_parameters(), ffn_flops(), moe_layer_flops(), param_count(): every count of parameters and FLOPs
    ensembles  train_ensemble(), average_probs(), brier_decomposition(): second opinions (lesson 02)
    gating     softmax_gate(), SoftmaxGate: the GP weighs every doctor (lesson 03)
    mixture    DenseMixture: every expert on every patient, weighed by the gate (lesson 03)
    specialisation  gate_mass_by_specialty(), specialisation_score(): did the experts specialise?
    routing    the GP: top_k_routing(), switch_routing(), noisy_top_k_routing(), mixtral_routing(), sigmoid_routing(),
               expert_choice_routing(), capacity_mask()
    losses     load_balancing_loss(), router_z_loss(), importance_loss(): keep every doctor busy
    dispatch   sort_dispatch(): send tokens to their experts, weigh and add up what comes back
    fast/      the same computations arranged for speed (hand-written backward, threads, grouped matmuls)
    moe        MoEConfig, MoELayer: a router in front of E experts, returns MoEOutput; upcycle()
    bias_balancing  update_expert_biases_(): DeepSeek-V3's loss-free balancing, a rule and a training hook (lesson 10)
    models     ClinicMoE: embed, one MoE layer, classify (the clinic lessons)
    routed     RoutedMixture: the dense mixture's gate and experts, each patient sees its top-k (lesson 04)
    approaches four_approaches(): the essay's four approaches measured side by side over seeds (lesson 04)
    workers    run_in_workers(): independent jobs (seeds, models) in one-thread worker processes
    balance    LoadTracker, evaluate_capacity(), capacity_sweep(): load, drops and capacity (lesson 05)
    playground train_clinic_moe(), clinic_day(): lesson 05's playground, computed
    corpus     Corpus, CharTokenizer: the multi-domain character corpus (lessons 07-08)
    attention  CausalSelfAttention, causal_mask(), rotary_embedding(): tokens talk to each other
    transformer  GPT, GPTConfig: a dense or Switch character GPT; param_count(), flops_per_token()
    lm         LMTask: next-character loss, held-out loss per domain; complete()
    lm_routing routing_report(), RoutingTracker: which expert gets which tokens, per layer
    train      `moe-train`: train a language model from the shell, with checkpoints and metrics
    metrics    accuracy_by_group()
    training   train(), TrainConfig, ClassificationTask
    timing     time_per_batch(): models timed side by side, as paired ratios (bench.paired_times)
    plots      figures the lessons share
    show       show_source(): read the package's code inside a lesson
    checks     check("N.M", answer): the hidden tests of the exercises
    exercises  `moe-exercises build`: exercises/ generated from solutions/
    course     `moe-course`: the learner's command (lab, check, progress, reset, restore, update)

Shape legend, used everywhere: B batch, T time, D model width, F hidden width,
E experts, K top-k, C capacity, N = B·T tokens.
"""

__version__ = "0.1.0"
__all__ = ["get_device", "seed_everything", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `python -m moe_course progress` answers without loading torch.
    if name in ("get_device", "seed_everything"):
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module 'moe_course' has no attribute {name!r}")
