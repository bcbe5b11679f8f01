"""Every key SimpleTuner itself knows, so an import can tell "not supported yet" from a typo.

A key in a SimpleTuner config that we do not handle is one of two things: an option SimpleTuner
has and we have not built (U-REPA...), which is worth a warning and no
more, or a key nobody has (``learning_rat``), which SimpleTuner's own parser refuses and which
would otherwise train at a default the user meant to change. Telling them apart needs the list of
SimpleTuner's real keys, kept here as data.

Source: bghira/SimpleTuner at ``bc8e6ab7738c`` (2026-08-22), the snapshot that
``reference/simpletuner.md`` describes. Only the key names were taken (facts, no code):

- :data:`CONFIG_KEYS`: every ``arg_name`` and alias of the WebUI field registry
  (``simpletuner/simpletuner_sdk/server/services/field_registry/sections/*.py``), from which
  ``helpers/configuration/cmd_args.py`` builds the argparse parser that reads ``config.json``;
  ``text_encoder_{1..4}_precision`` are generated there in a loop.
- :data:`LEGACY_CONFIG_KEYS`: keys its ``config.json`` loader still accepts and rewrites or
  drops (``helpers/configuration/cli_utils.py``'s legacy handlers, ``ignore_final_epochs`` in
  ``cmd_args.py``, the WebUI's own bookkeeping keys).
- :data:`DATASET_KEYS`: the keys ``multidatabackend.json`` entries are read with
  (``helpers/data_backend/factory.py`` and ``helpers/data_backend/config/*.py``, minus the
  runtime objects the factory stores in the same dicts) plus those ``documentation/DATALOADER.md``
  documents.

To update: re-read those files of a newer snapshot and add the new names; the tests check that
every key of our own TrainSpec that is not in ``simpletuner.TUNER_ONLY_KEYS`` is in these lists,
so a renamed or misspelt field of ours cannot slip in unnoticed either.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

SOURCE = "bghira/SimpleTuner bc8e6ab7738c (2026-08-22)"

CONFIG_KEYS: frozenset[str] = frozenset(
    """
    accelerate_config accelerate_extra_args accelerator_cache_clear_interval adam_beta1 adam_beta2 adam_epsilon
    adam_weight_decay allow_dataset_oversubscription aspect_bucket_alignment aspect_bucket_disable_rebuild
    aspect_bucket_rounding aspect_bucket_worker_count assistant_lora_inference_strength assistant_lora_path
    assistant_lora_strength attention_mechanism audio_channels audio_duration_interval audio_flow_schedule_shift
    audio_max_duration_seconds audio_min_duration_seconds audio_truncation_mode aws_max_pool_connections
    base_model_default_dtype base_model_precision cache_dir cache_dir_text cache_dir_vae
    caption_dropout_probability caption_strategy checkpoint_epoch_interval checkpoint_step_interval
    checkpointing_rolling_steps checkpointing_steps checkpointing_use_tempdir checkpoints_rolling_total_limit
    checkpoints_total_limit compress_disk_cache conditioning_multidataset_sampling
    context_parallel_comm_strategy context_parallel_size control controlnet controlnet_custom_config
    controlnet_model_name_or_path crepa_adjacent_distance crepa_adjacent_tau crepa_block_index crepa_cutoff_step
    crepa_decay_steps crepa_drop_vae_encoder crepa_enabled crepa_encoder crepa_encoder_frames_batch_size
    crepa_encoder_image_size crepa_feature_source crepa_lambda crepa_lambda_end crepa_normalize_by_frames
    crepa_normalize_neighbour_sum crepa_power crepa_scheduler crepa_self_flow crepa_self_flow_mask_ratio
    crepa_similarity_ema_decay crepa_similarity_threshold crepa_spatial_align crepa_teacher_block_index
    crepa_threshold_mode crepa_use_backbone_features crepa_use_tae crepa_warmup_steps custom_tracker
    data_aesthetic_score data_backend_config data_backend_sampling dataloader_prefetch dataloader_prefetch_qlen
    debug_aspect_buckets debug_dataset_loader deepspeed_config delete_invalid_checkpoints
    delete_model_after_load delete_nsfw_images delete_problematic_images delete_unwanted_images
    diff2flow_enabled diff2flow_loss diffusion_blocks_config disable_assistant_lora disable_benchmark
    disable_bucket_pruning disable_segmented_timestep_sampling disable_tf32 disk_low_action disk_low_script
    disk_low_threshold distillation_config distillation_method dynamo_backend dynamo_dynamic dynamo_fullgraph
    dynamo_mode dynamo_use_regional_compilation ema_cpu_only ema_decay ema_device ema_foreach_disable
    ema_update_interval ema_validation ema_warmup_steps enable_group_offload enable_multiprocessing
    enable_nsfw_check enable_watermark eval_dataset_id eval_dataset_pooling eval_epoch_interval
    eval_loss_disable eval_steps_interval eval_timesteps evaluation_type find_unused_parameters
    flow_beta_schedule_alpha flow_beta_schedule_beta flow_cubic_schedule_weights flow_custom_timesteps
    flow_schedule_auto_shift flow_schedule_shift flow_sigmoid_scale flow_timesteps_mode flow_use_beta_schedule
    flow_use_uniform_schedule framerate freeze_encoder_after freeze_encoder_before freeze_encoder_strategy
    fsdp_activation_checkpointing fsdp_auto_wrap_policy fsdp_cpu_offload fsdp_cpu_ram_efficient_loading
    fsdp_enable fsdp_limit_all_gathers fsdp_reshard_after_forward fsdp_state_dict_type
    fsdp_transformer_layer_cls_to_wrap fsdp_version fully_unload_text_encoder fuse_optimizer grad_clip_method
    gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_backend
    gradient_checkpointing_interval gradient_checkpointing_offload_attention
    gradient_checkpointing_offload_pin_memory_max_buckets gradient_checkpointing_offload_prefetch
    gradient_checkpointing_segment_stride gradient_precision group_offload_blocks_per_group
    group_offload_text_encoder group_offload_to_disk_path group_offload_type group_offload_use_stream
    group_offload_vae hub_model_id huber_c huber_schedule i_know_what_i_am_doing ignore_missing_files
    image_processing_batch_size inference_scheduler_timestep_spacing init_lokr_norm init_lora init_lora_ema
    init_lora_step input_perturbation input_perturbation_steps instance_prompt internal_guidance_block_index
    internal_guidance_enabled internal_guidance_loss_weight irepa_enabled irepa_projector_kernel_size
    irepa_spatial_norm_alpha keep_vae_loaded layer_freeze_strategy layersync_enabled layersync_lambda
    layersync_student_block layersync_teacher_block learning_rate local_rank logging_dir lora_alpha lora_dropout
    lora_format lora_init_type lora_rank lora_type loss_type lr_end lr_num_cycles lr_power lr_scale
    lr_scale_sqrt lr_scheduler lr_warmup_steps lycoris_config machine_rank main_process_ip main_process_port
    masked_loss_probability max_grad_norm max_grounding_entities max_train_steps max_upscale_threshold
    max_workers maximum_image_size metadata_update_interval minimum_image_size mixed_precision mixflow_enabled
    mixflow_gamma model_card_note model_card_private model_card_safe_for_work model_family model_flavour
    model_type modelspec_comment musubi_block_swap_device musubi_blocks_to_swap nextlat_block_index
    nextlat_enabled nextlat_kl_weight nextlat_state_loss nextlat_weight noise_offset noise_offset_probability
    nsfw_check_backend_types nsfw_check_min_votes nsfw_check_models nsfw_check_sample_types
    nsfw_check_video_frame_count nsfw_check_video_frame_selection nsfw_check_video_min_flagged_frames
    num_eval_images num_machines num_processes num_train_epochs num_validation_images offload_during_save
    offload_during_startup offload_param_path offset_noise only_instance_prompt optimizer optimizer_beta1
    optimizer_beta2 optimizer_config optimizer_cpu_offload_method optimizer_offload_gradients
    optimizer_release_gradients output_dir override_dataset_config parquet_caption_column
    parquet_filename_column peft_lora_mode peft_lora_target_modules post_checkpoint_script post_upload_script
    prediction_type prepend_instance_prompt preserve_data_backend_cache pretrained_evaluation_model_name_or_path
    pretrained_gemma_model_name_or_path pretrained_grounding_model_name_or_path pretrained_model_name_or_path
    pretrained_t5_model_name_or_path pretrained_transformer_model_name_or_path pretrained_transformer_subfolder
    pretrained_unet_model_name_or_path pretrained_unet_subfolder pretrained_vae_model_name_or_path
    print_filenames print_sampler_statistics prodigy_steps publishing_config push_checkpoints_to_hub push_to_hub
    push_to_hub_background quantization_config quantize_activations quantize_via
    qwen_text_encoder_model_name_or_path ramtorch ramtorch_controlnet ramtorch_disable_extensions
    ramtorch_disable_sync_hooks ramtorch_target_modules ramtorch_text_encoder ramtorch_text_encoder_percent
    ramtorch_transformer_percent ramtorch_vae read_batch_size refiner_training refiner_training_invert_schedule
    refiner_training_strength report_to rescale_betas_zero_snr resolution resolution_type resume_from_checkpoint
    revision sageattention_usage same_network save_text_encoder scheduled_sampling_max_step_offset
    scheduled_sampling_order scheduled_sampling_prob_end scheduled_sampling_prob_start
    scheduled_sampling_probability scheduled_sampling_ramp_shape scheduled_sampling_ramp_steps
    scheduled_sampling_reflexflow scheduled_sampling_reflexflow_alpha scheduled_sampling_reflexflow_beta1
    scheduled_sampling_reflexflow_beta2 scheduled_sampling_sampler scheduled_sampling_start_step
    scheduled_sampling_strategy sdnq_compile_mode sdnq_dequantize_fp32 sdnq_group_size sdnq_hadamard_group_size
    sdnq_modules_dtype_dict sdnq_modules_quant_config sdnq_modules_to_not_convert sdnq_modules_to_not_use_matmul
    sdnq_quantized_matmul_dtype sdnq_svd_rank sdnq_svd_steps sdnq_use_hadamard sdnq_use_quantized_matmul
    sdnq_use_static_quantization sdnq_use_stochastic_rounding sdnq_use_svd sdnq_weights_dtype seed
    seed_for_each_device set_grads_to_none singlora_ramp_up_steps skip_file_discovery sla_config
    slider_lora_target snr_gamma snr_weight soft_min_snr_sigma_data strict_epoch_limit t5_padding
    target_downsample_size text_cache_disable text_cache_ondemand text_embed_full_cache text_encoder_1_precision
    text_encoder_2_precision text_encoder_3_precision text_encoder_4_precision text_encoder_batch_size
    text_encoder_limit text_encoder_lr timestep_bias_begin timestep_bias_end timestep_bias_multiplier
    timestep_bias_portion timestep_bias_strategy tokenizer_max_length torch_num_threads tracker_image_layout
    tracker_project_name tracker_run_name train_batch_size train_text_encoder
    training_scheduler_timestep_spacing tread_config trust_remote_code twinflow_enabled
    twinflow_target_step_count unet_attention_slice urepa_cutoff_step urepa_decay_steps urepa_enabled
    urepa_encoder_image_size urepa_lambda urepa_lambda_end urepa_manifold_weight urepa_model urepa_power
    urepa_scheduler urepa_similarity_ema_decay urepa_similarity_threshold urepa_threshold_mode urepa_use_tae
    urepa_warmup_steps use_dora use_ema use_soft_min_snr user_prompt_library vae_batch_size vae_cache_disable
    vae_cache_ondemand vae_cache_scan_behaviour vae_dtype vae_enable_patch_conv vae_enable_slicing
    vae_enable_temporal_roll vae_enable_tiling validate_after_epoch validate_after_step
    validation_adapter_config validation_adapter_mode validation_adapter_name validation_adapter_path
    validation_adapter_strength validation_disable validation_disable_unconditional validation_epoch_interval
    validation_external_background validation_external_script validation_guidance validation_guidance_rescale
    validation_guidance_skip_layers validation_guidance_skip_layers_start validation_guidance_skip_layers_stop
    validation_guidance_skip_scale validation_image_format validation_image_quality validation_input
    validation_internal_guidance_scale validation_lycoris_strength validation_method validation_multigpu
    validation_negative_prompt validation_noise_scheduler validation_num_inference_steps
    validation_num_video_frames validation_on_startup validation_preview validation_preview_steps
    validation_prompt validation_prompt_library validation_randomize validation_resolution validation_seed
    validation_seed_source validation_step_interval validation_steps validation_stitch_input_location
    validation_using_datasets variant webhook_config webhook_reporting_interval write_batch_size xm_block_size
    xm_candidate_count xm_enabled xm_selection_scope xm_training_target
    """.split()
)

LEGACY_CONFIG_KEYS: frozenset[str] = frozenset(
    """
    __active_tab__ __disabled_fields__ aspect_ratio_bucket_max aspect_ratio_bucket_min aspect_ratio_bucketing
    ez_model_type ignore_final_epochs repeats save_total_limit vae_cache_preprocess
    """.split()
)

DATASET_KEYS: frozenset[str] = frozenset(
    """
    audio audio_column auto_generated auto_load aws aws_access_key_id aws_bucket_name aws_data_prefix
    aws_endpoint_url aws_max_pool_connections aws_region_name aws_secret_access_key aws_session_token
    buffer_size cache_dir cache_dir_conditioning_image_embeds cache_dir_vae cache_file_suffix
    caption_file_extensions caption_filter_list caption_shuffle caption_strategy clear_cache_each_epoch
    composite_image_column compress_cache conditioning conditioning_config conditioning_data
    conditioning_image_embed_batch_size conditioning_image_embeds conditioning_type crop crop_aspect
    crop_aspect_buckets crop_style csv_cache_dir csv_caption_column csv_file csv_url_column dataset_name
    dataset_type default delete_nsfw_images delete_problematic_images delete_unwanted_images disable
    disable_multiline_split disable_validation disabled distillation_type end_epoch end_step grounding
    grounding_data hash_filenames hf_token huggingface id image_column image_embeds image_processing_batch_size
    instance_data_dir instance_data_root instance_prompt is_regularisation_data is_regularization_data
    max_file_size max_num_samples max_upscale_threshold max_workers maximum_aspect_ratio maximum_image_size
    metadata metadata_backend metadata_update_interval minimum_aspect_ratio minimum_image_size num_proc
    only_instance_prompt parallel_downloads parquet prepend_instance_prompt preserve_data_backend_cache
    probability read_batch_size repeats resolution resolution_type revision s2v_datasets scan_for_errors
    shard_cache_gb shorten_filenames shuffle skip_file_discovery slider_strength source source_dataset_id split
    split_composite_images start_epoch start_step streaming subfolder target_downsample_size text_cache_disable
    text_cache_ondemand text_embeds text_encoder_batch_size timestep_sampling_offset train_batch_size type
    vae_batch_size vae_cache_clear_each_epoch vae_cache_disable vae_cache_ondemand vae_cache_scan_behaviour
    video video_column webshart webshart_optimise_captions webshart_optimize_captions write_batch_size
    """.split()
)


def did_you_mean(key: str, candidates: Iterable[str]) -> str | None:
    """The known key closest to ``key`` (a typo's likely intent), or None when nothing is close.

    ``difflib``'s ratio at 0.75 catches one or two wrong, missing or swapped letters in keys of
    SimpleTuner's length (``learning_rat``, ``lora_rnak``, ``max_train_step``) without proposing an
    unrelated key for a word that is simply foreign. Case and dashes are ignored, as a user who
    writes ``Learning-Rate`` means ``learning_rate``.
    """
    pool = {c.lower().replace("-", "_"): c for c in candidates}
    wanted = key.strip().lstrip("-").lower().replace("-", "_")
    if wanted in pool:
        return pool[wanted]
    found = difflib.get_close_matches(wanted, list(pool), n=1, cutoff=0.75)
    return pool[found[0]] if found else None
