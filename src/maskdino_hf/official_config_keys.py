"""The keys of a complete official Mask DINO config and the type of each value: detectron2's defaults plus MaskDINO's
`add_maskdino_config`.

Read from configs dumped by the official code (the fixtures under `tests/fixtures/official/*/config.yaml`, which
`tests/test_bad_inputs.py` checks against this table). detectron2 refuses any other key, and a value of another
type, when it merges a yaml; `convert_maskdino_to_hf.load_official_config` does the same, so a typo is not silently
replaced by the default and `TWO_STAGE: "false"` is not read as true.
"""

# Config node (dotted, "" for the top level) -> {leaf key: type of its value} (None: any type, as detectron2).
OFFICIAL_CONFIG_LEAVES: dict[str, dict[str, type | None]] = {
    "": {
        "CUDNN_BENCHMARK": bool, "Default_loading": bool, "FLOAT32_PRECISION": str, "OUTPUT_DIR": str, "SEED": int,
        "VERSION": int, "VIS_PERIOD": int,
    },
    "DATALOADER": {
        "ASPECT_RATIO_GROUPING": bool, "FILTER_EMPTY_ANNOTATIONS": bool, "NUM_WORKERS": int, "REPEAT_SQRT": bool,
        "REPEAT_THRESHOLD": float, "SAMPLER_TRAIN": str,
    },
    "DATASETS": {
        "PRECOMPUTED_PROPOSAL_TOPK_TEST": int, "PRECOMPUTED_PROPOSAL_TOPK_TRAIN": int, "PROPOSAL_FILES_TEST": list,
        "PROPOSAL_FILES_TRAIN": list, "TEST": list, "TRAIN": list,
    },
    "GLOBAL": {
        "HACK": float,
    },
    "INPUT": {
        "COLOR_AUG_SSD": bool, "DATASET_MAPPER_NAME": str, "FORMAT": str, "IMAGE_SIZE": int, "MASK_FORMAT": str,
        "MAX_SCALE": float, "MAX_SIZE_TEST": int, "MAX_SIZE_TRAIN": int, "MIN_SCALE": float, "MIN_SIZE_TEST": int,
        "MIN_SIZE_TRAIN": list, "MIN_SIZE_TRAIN_SAMPLING": str, "RANDOM_FLIP": str, "SIZE_DIVISIBILITY": int,
    },
    "INPUT.CROP": {
        "ENABLED": bool, "SINGLE_CATEGORY_MAX_AREA": float, "SIZE": list, "TYPE": str,
    },
    "MODEL": {
        "DEVICE": str, "KEYPOINT_ON": bool, "LOAD_PROPOSALS": bool, "MASK_ON": bool, "META_ARCHITECTURE": str,
        "PIXEL_MEAN": list, "PIXEL_STD": list, "WEIGHTS": str,
    },
    "MODEL.ANCHOR_GENERATOR": {
        "ANGLES": list, "ASPECT_RATIOS": list, "NAME": str, "OFFSET": float, "SIZES": list,
    },
    "MODEL.BACKBONE": {
        "FREEZE_AT": int, "NAME": str,
    },
    "MODEL.FPN": {
        "FUSE_TYPE": str, "IN_FEATURES": list, "NORM": str, "OUT_CHANNELS": int,
    },
    "MODEL.MaskDINO": {
        "BOX_LOSS": bool, "BOX_WEIGHT": float, "CLASS_WEIGHT": float, "COST_BOX_WEIGHT": float, "COST_CLASS_WEIGHT":
        float, "COST_DICE_WEIGHT": float, "COST_GIOU_WEIGHT": float, "COST_MASK_WEIGHT": float, "DEC_LAYERS": int,
        "DEEP_SUPERVISION": bool, "DICE_WEIGHT": float, "DIM_FEEDFORWARD": int, "DN": str, "DN_NOISE_SCALE": float,
        "DN_NUM": int, "DROPOUT": float, "ENC_LAYERS": int, "ENFORCE_INPUT_PROJ": bool, "EVAL_FLAG": int,
        "GIOU_WEIGHT": float, "HIDDEN_DIM": int, "IMPORTANCE_SAMPLE_RATIO": float, "INITIALIZE_BOX_TYPE": str,
        "INITIAL_PRED": bool, "LEARN_TGT": bool, "MASK_WEIGHT": float, "NHEADS": int, "NO_OBJECT_WEIGHT": float,
        "NUM_OBJECT_QUERIES": int, "OVERSAMPLE_RATIO": float, "PANO_BOX_LOSS": bool, "PRED_CONV": bool, "PRE_NORM":
        bool, "SEMANTIC_CE_LOSS": bool, "SIZE_DIVISIBILITY": int, "TRAIN_NUM_POINTS": int,
        "TRANSFORMER_DECODER_NAME": str, "TWO_STAGE": bool,
    },
    "MODEL.MaskDINO.TEST": {
        "INSTANCE_ON": bool, "OBJECT_MASK_THRESHOLD": float, "OVERLAP_THRESHOLD": float, "PANOPTIC_ON": bool,
        "PANO_TEMPERATURE": float, "PANO_TRANSFORM_EVAL": bool, "SEMANTIC_ON": bool,
        "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": bool, "TEST_FOUCUS_ON_BOX": bool,
    },
    "MODEL.PANOPTIC_FPN": {
        "INSTANCE_LOSS_WEIGHT": float,
    },
    "MODEL.PANOPTIC_FPN.COMBINE": {
        "ENABLED": bool, "INSTANCES_CONFIDENCE_THRESH": float, "OVERLAP_THRESH": float, "STUFF_AREA_LIMIT": int,
    },
    "MODEL.PROPOSAL_GENERATOR": {
        "MIN_SIZE": int, "NAME": str,
    },
    "MODEL.RESNETS": {
        "DEFORM_MODULATED": bool, "DEFORM_NUM_GROUPS": int, "DEFORM_ON_PER_STAGE": list, "DEPTH": int, "NORM": str,
        "NUM_GROUPS": int, "OUT_FEATURES": list, "RES2_OUT_CHANNELS": int, "RES4_DILATION": int, "RES5_DILATION":
        int, "RES5_MULTI_GRID": list, "STEM_OUT_CHANNELS": int, "STEM_TYPE": str, "STRIDE_IN_1X1": bool,
        "WIDTH_PER_GROUP": int,
    },
    "MODEL.RETINANET": {
        "BBOX_REG_LOSS_TYPE": str, "BBOX_REG_WEIGHTS": list, "FOCAL_LOSS_ALPHA": float, "FOCAL_LOSS_GAMMA": float,
        "IN_FEATURES": list, "IOU_LABELS": list, "IOU_THRESHOLDS": list, "NMS_THRESH_TEST": float, "NORM": str,
        "NUM_CLASSES": int, "NUM_CONVS": int, "PRIOR_PROB": float, "SCORE_THRESH_TEST": float,
        "SMOOTH_L1_LOSS_BETA": float, "TOPK_CANDIDATES_TEST": int,
    },
    "MODEL.ROI_BOX_CASCADE_HEAD": {
        "BBOX_REG_WEIGHTS": list, "IOUS": list,
    },
    "MODEL.ROI_BOX_HEAD": {
        "BBOX_REG_LOSS_TYPE": str, "BBOX_REG_LOSS_WEIGHT": float, "BBOX_REG_WEIGHTS": list, "CLS_AGNOSTIC_BBOX_REG":
        bool, "CONV_DIM": int, "FC_DIM": int, "FED_LOSS_FREQ_WEIGHT_POWER": float, "FED_LOSS_NUM_CLASSES": int,
        "NAME": str, "NORM": str, "NUM_CONV": int, "NUM_FC": int, "POOLER_RESOLUTION": int, "POOLER_SAMPLING_RATIO":
        int, "POOLER_TYPE": str, "SMOOTH_L1_BETA": float, "TRAIN_ON_PRED_BOXES": bool, "USE_FED_LOSS": bool,
        "USE_SIGMOID_CE": bool,
    },
    "MODEL.ROI_HEADS": {
        "BATCH_SIZE_PER_IMAGE": int, "IN_FEATURES": list, "IOU_LABELS": list, "IOU_THRESHOLDS": list, "NAME": str,
        "NMS_THRESH_TEST": float, "NUM_CLASSES": int, "POSITIVE_FRACTION": float, "PROPOSAL_APPEND_GT": bool,
        "SCORE_THRESH_TEST": float,
    },
    "MODEL.ROI_KEYPOINT_HEAD": {
        "CONV_DIMS": list, "LOSS_WEIGHT": float, "MIN_KEYPOINTS_PER_IMAGE": int, "NAME": str,
        "NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS": bool, "NUM_KEYPOINTS": int, "POOLER_RESOLUTION": int,
        "POOLER_SAMPLING_RATIO": int, "POOLER_TYPE": str,
    },
    "MODEL.ROI_MASK_HEAD": {
        "CLS_AGNOSTIC_MASK": bool, "CONV_DIM": int, "NAME": str, "NORM": str, "NUM_CONV": int, "POOLER_RESOLUTION":
        int, "POOLER_SAMPLING_RATIO": int, "POOLER_TYPE": str,
    },
    "MODEL.RPN": {
        "BATCH_SIZE_PER_IMAGE": int, "BBOX_REG_LOSS_TYPE": str, "BBOX_REG_LOSS_WEIGHT": float, "BBOX_REG_WEIGHTS":
        list, "BOUNDARY_THRESH": int, "CONV_DIMS": list, "HEAD_NAME": str, "IN_FEATURES": list, "IOU_LABELS": list,
        "IOU_THRESHOLDS": list, "LOSS_WEIGHT": float, "NMS_THRESH": float, "POSITIVE_FRACTION": float,
        "POST_NMS_TOPK_TEST": int, "POST_NMS_TOPK_TRAIN": int, "PRE_NMS_TOPK_TEST": int, "PRE_NMS_TOPK_TRAIN": int,
        "SMOOTH_L1_BETA": float,
    },
    "MODEL.SEM_SEG_HEAD": {
        "ASPP_CHANNELS": int, "ASPP_DILATIONS": list, "ASPP_DROPOUT": float, "COMMON_STRIDE": int, "CONVS_DIM": int,
        "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": list, "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": int,
        "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": int, "DIM_FEEDFORWARD": int, "FEATURE_ORDER": str,
        "IGNORE_VALUE": int, "IN_FEATURES": list, "LOSS_TYPE": str, "LOSS_WEIGHT": float, "MASK_DIM": int, "NAME":
        str, "NORM": str, "NUM_CLASSES": int, "NUM_FEATURE_LEVELS": int, "PIXEL_DECODER_NAME": str,
        "PROJECT_CHANNELS": list, "PROJECT_FEATURES": list, "TOTAL_NUM_FEATURE_LEVELS": int,
        "TRANSFORMER_ENC_LAYERS": int, "USE_DEPTHWISE_SEPARABLE_CONV": bool,
    },
    "MODEL.SWIN": {
        "APE": bool, "ATTN_DROP_RATE": float, "DEPTHS": list, "DROP_PATH_RATE": float, "DROP_RATE": float,
        "EMBED_DIM": int, "MLP_RATIO": float, "NUM_HEADS": list, "OUT_FEATURES": list, "PATCH_NORM": bool,
        "PATCH_SIZE": int, "PRETRAIN_IMG_SIZE": int, "QKV_BIAS": bool, "QK_SCALE": None, "USE_CHECKPOINT": bool,
        "WINDOW_SIZE": int,
    },
    "SOLVER": {
        "BACKBONE_MULTIPLIER": float, "BASE_LR": float, "BASE_LR_END": float, "BIAS_LR_FACTOR": float,
        "CHECKPOINT_PERIOD": int, "GAMMA": float, "IMS_PER_BATCH": int, "LR_SCHEDULER_NAME": str, "MAX_ITER": int,
        "MOMENTUM": float, "NESTEROV": bool, "NUM_DECAYS": int, "OPTIMIZER": str, "POLY_LR_CONSTANT_ENDING": float,
        "POLY_LR_POWER": float, "REFERENCE_WORLD_SIZE": int, "RESCALE_INTERVAL": bool, "STEPS": list,
        "WARMUP_FACTOR": float, "WARMUP_ITERS": int, "WARMUP_METHOD": str, "WEIGHT_DECAY": float,
        "WEIGHT_DECAY_BIAS": None, "WEIGHT_DECAY_EMBED": float, "WEIGHT_DECAY_NORM": float,
    },
    "SOLVER.AMP": {
        "ENABLED": bool,
    },
    "SOLVER.CLIP_GRADIENTS": {
        "CLIP_TYPE": str, "CLIP_VALUE": float, "ENABLED": bool, "NORM_TYPE": float,
    },
    "TEST": {
        "DETECTIONS_PER_IMAGE": int, "EVAL_PERIOD": int, "EXPECTED_RESULTS": list, "KEYPOINT_OKS_SIGMAS": list,
    },
    "TEST.AUG": {
        "ENABLED": bool, "FLIP": bool, "MAX_SIZE": int, "MIN_SIZES": list,
    },
    "TEST.PRECISE_BN": {
        "ENABLED": bool, "NUM_ITER": int,
    },
}

__all__ = ["OFFICIAL_CONFIG_LEAVES"]
