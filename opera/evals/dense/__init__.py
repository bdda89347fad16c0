"""Dense transfer: semantic segmentation (UperNet / FCN, mIoU) and detection + instance
segmentation (torchvision Mask R-CNN with FPN, pycocotools AP) on a pretrained backbone.

``run_dense(dense_config("segmentation", data="digit_scenes:7-9", checkpoint=RUN, output=OUT))``;
``opera run transfer --suite segmentation|detection`` on the command line.
"""

from opera.evals.dense.run import TASKS, DenseConfig, dense_config, list_recipes, run_dense

__all__ = ["DenseConfig", "TASKS", "dense_config", "list_recipes", "run_dense"]
