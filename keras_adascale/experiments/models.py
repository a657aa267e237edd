"""The model registry of the experiment runner: MLP, small CNN, CIFAR ResNets, ResNet-50, char LM.

Keras is imported inside the builders: the config takes its list of model names from
`REGISTRY`, and `keras-adascale --help` reads the config without importing TensorFlow.
"""


def mlp(input_shape, num_classes, hidden_units=(512, 512)):
    """A ReLU multi-layer perceptron on the flattened input."""
    import keras

    layers = [keras.Input(input_shape), keras.layers.Flatten()]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden_units]
    layers.append(keras.layers.Dense(num_classes))
    return keras.Sequential(layers, name="mlp")


def small_cnn(input_shape, num_classes):
    """Two conv + pool blocks and a dense layer: about 100k parameters on 28x28x1."""
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="small_cnn",
    )


def _basic_block(x, filters, stride):
    import keras

    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = keras.layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = keras.layers.BatchNormalization()(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def _cifar_resnet(input_shape, num_classes, stage_filters, blocks_per_stage, name):
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(stage_filters[0], 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    for stage, filters in enumerate(stage_filters):
        for block in range(blocks_per_stage):
            x = _basic_block(x, filters, stride=2 if stage > 0 and block == 0 else 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name=name)


def resnet20(input_shape, num_classes):
    """ResNet-20 for 32x32 images (He et al. 2016, section 4.2): 3 stages of 3 blocks, 16/32/64."""
    return _cifar_resnet(input_shape, num_classes, (16, 32, 64), 3, "resnet20")


def resnet18(input_shape, num_classes):
    """ResNet-18 with a 3x3 stem for 32x32 images: 4 stages of 2 blocks, 64/128/256/512 filters."""
    return _cifar_resnet(input_shape, num_classes, (64, 128, 256, 512), 2, "resnet18")


def resnet50(input_shape, num_classes):
    """`keras.applications.ResNet50`, randomly initialised (for ImageNet-sized images)."""
    import keras

    return keras.applications.ResNet50(
        weights=None, input_shape=input_shape, classes=num_classes, classifier_activation=None
    )


def char_lm(input_shape, num_classes, width=128, dilations=(1, 2, 4, 8)):
    """A causal convolutional character language model: about 256k parameters for 256 byte values.

    Embedding(vocabulary, 64) and a projection to `width` channels, then a
    residual block per dilation d: x + Conv1D(width, 3, dilation d, causal,
    ReLU)(LayerNorm(x)); a final LayerNorm and Dense(vocabulary). Each
    position sees itself and the 30 characters before it (1 + 2 x (1 + 2 +
    4 + 8)), never a later one. Convolutions rather than attention: on 2 CPU
    cores a 2-layer Transformer decoder of the same size trained about 4x
    slower.

    Args:
        input_shape: `(sequence_length,)` of the token ids.
        num_classes: the vocabulary size, of the input tokens and of the
            output logits (one set per position).
    """
    import keras

    inputs = keras.Input(input_shape, dtype="int32")
    x = keras.layers.Dense(width)(keras.layers.Embedding(num_classes, 64)(inputs))
    for dilation in dilations:
        y = keras.layers.LayerNormalization()(x)
        y = keras.layers.Conv1D(width, 3, dilation_rate=dilation, padding="causal", activation="relu")(y)
        x = keras.layers.Add()([x, y])
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="char_lm")


# name -> builder(input_shape, num_classes); the config's `model.name` choices, in this order.
REGISTRY = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "char_lm": char_lm,
}
# The models of token sequences (a dataset with token inputs and per-position targets); the
# others take images.
LANGUAGE_MODELS = ("char_lm",)


def per_replica(model, groups=1):
    """The same layers, inputs and outputs as a `keras_adascale.AdaScaleModel` (a functional model).

    Under a `keras.distribution` on JAX its train step gives an AdaScale optimizer each replica's
    gradient statistics (and with `groups` > 1, each group's of each replica's batch); elsewhere it trains
    as `model` does.
    """
    from keras_adascale import AdaScaleModel

    return AdaScaleModel(model.inputs, model.outputs, name=model.name, groups=groups)


def build(config, input_shape, num_classes):
    """Builds the model a config's `model` section names, with logits as output.

    Args:
        config: the `model` section of a resolved config.
        input_shape: shape of one example, e.g. `(28, 28, 1)`, or `(sequence_length,)`
            of a language model's token ids.
        num_classes: number of output logits (per position for a language model:
            the vocabulary size).

    Returns:
        A `keras.Model`, not compiled.
    """
    if config["name"] == "mlp":
        return mlp(input_shape, num_classes, config["hidden_units"])
    return REGISTRY[config["name"]](input_shape, num_classes)
