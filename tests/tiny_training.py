"""The training settings of every test that trains through the flows: 64 px images, a few views and
three fine-tuning steps, so a fit takes seconds yet runs every stage (fine-tuning, leave-one-out
calibration, the patch memory). One definition, so a new DetectorConfig field that the tests must
pin is pinned once."""

TINY_TRAINING = {"size": 64, "patch_size": 64, "pool_views": 16, "negatives": 4, "calibration_negatives": 4,
                 "memory_views": 1, "finetune": {"steps": 3, "normals_per_batch": 8, "negatives_per_batch": 4}}

# For the tests of faults that retrain a product several times and expect each good version to
# become champion: their uploads' eval sets are too small to compare versions on (labelled
# evidence needs 5 defects and 5 normals), and the gate's policy is tested apart.
TINY_TRAINING_PROMOTING = {**TINY_TRAINING, "loop": {"allow_unproven": True}}
