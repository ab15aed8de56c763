"""Package metadata for estimator-transfer."""
import setuptools

setuptools.setup(
    name="estimator-transfer",
    version="0.1.0",
    description=("Transfer learning and retraining of pretrained backbones on "
                 "tf.compat.v1.estimator: frozen layers, piecewise learning "
                 "rates, absl-flag scripts, TF Serving exports."),
    packages=setuptools.find_packages(include=["estimator_transfer", "estimator_transfer.*"]),
    python_requires=">=3.9,<3.12",
    install_requires=[
        # 2.15 is the last TensorFlow release that ships tf.estimator.
        "tensorflow==2.15.*",
        "tensorflow-estimator==2.15.*",
        # 0.15.0 still loads TF1 Hub modules (hub.Module) next to TF2
        # SavedModels and does not pull tf-keras (which drags TF past 2.15).
        "tensorflow-hub==0.15.0",
        "absl-py>=1.0",
        "numpy<2",
        "pillow>=10.1",  # ImageFont.load_default(size=...): the confusion-matrix picture
    ],
    extras_require={
        "demo": ["scikit-learn>=1.2"],
        # matplotlib: demo/strategies.png (confusion_matrix.png is drawn with Pillow).
        "plots": ["matplotlib>=3.7"],
        "test": ["scikit-learn>=1.2", "pytest>=7", "pytest-xdist>=3", "matplotlib>=3.7", "tensorflow-serving-api==2.15.*"],
        # TF Serving warmup files (--serving_warmup) are PredictionLog protos.
        "serving": ["tensorflow-serving-api==2.15.*"],
    },
    entry_points={
        "console_scripts": [
            "et-train=estimator_transfer.cli.train:run",
            "et-evaluate=estimator_transfer.cli.evaluate:run",
            "et-export=estimator_transfer.cli.export:run",
            "et-local-cluster=estimator_transfer.cli.local_cluster:run",
            "et-inspect-export=estimator_transfer.cli.inspect_export:run",
            "et-predict=estimator_transfer.cli.predict:run",
            "et-prepare-data=estimator_transfer.cli.prepare_data:run",
            "et-retrain=estimator_transfer.cli.retrain:run",
        ],
    },
)
