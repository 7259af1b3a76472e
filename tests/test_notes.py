"""The lecture notes' worked numbers, file by file and slide by slide, each from a zoo call.

The five files of notes (the project's origin):
  000  CNN lecture slides: 개요, 구조, 개념, 이해, and the PyTorch MNIST model
  001  cs231n Lecture 5 (Convolutional Neural Networks), notes in Korean
  002  Keras MNIST notebook: the model, its summary table, the training log
  003  모두의 딥러닝 season 2, Lec 10: Convolution Neural Network
  004  Computer vision slides (강준규, 2020; after cs231n): filters, why CNNs, AlexNet, VGG
Where a slide contradicts itself or another slide, the test asserts the correct value and the
comment says what the slide prints.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import arithmetic, layers

EPS = float(np.finfo(np.float32).eps)

POOL6 = np.array([[1, 2, 0, 1, 3, 2], [3, 1, 2, 1, 0, 1], [0, 4, 1, 0, 2, 5],
                  [1, 3, 2, 4, 2, 1], [1, 2, 1, 4, 1, 2], [0, 2, 5, 4, 3, 1]], np.float32)
POOL4 = np.array([[31, 15, 28, 184], [0, 100, 70, 38], [12, 12, 7, 2], [12, 12, 45, 6]],
                 np.float32)


def shape_of(module, input_shape):
    """Output shape of one layer on one (H, W, C) image, traced abstractly."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda a: module.init_with_output(jax.random.key(0), a)[0], x).shape[1:]


def pool(cls, x):
    return cls(2).apply({}, jnp.asarray(x)[None, :, :, None])[0, :, :, 0]


def only_row(module, input_shape):
    (row,) = zoo.summary(module, input_shape, arithmetic=True).rows
    return row


def test_layers_reexports_the_arithmetic():
    """`zoo.layers.conv_output_size` and friends are a public contract: the same objects."""
    for name in ("conv_output_size", "conv_param_count", "dense_param_count", "receptive_field",
                 "steps_per_epoch", "KERNELS", "apply_filter"):
        assert getattr(layers, name) is getattr(arithmetic, name)


# ---------------------------------------------------------------- 000: CNN lecture slides

def test_000_sobel_filters():
    """000, "Intuition of Filter (엣지를 찾는 필터: 소벨 필터)": G_x and G_y."""
    np.testing.assert_array_equal(arithmetic.KERNELS["sobel_x"],
                                  [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    np.testing.assert_array_equal(arithmetic.KERNELS["sobel_y"],
                                  [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    # The slide's drawn "y filter" table prints +1 +2 +1 on top: the negation of its own G_y.
    np.testing.assert_array_equal(-arithmetic.KERNELS["sobel_y"],
                                  [[1, 2, 1], [0, 0, 0], [-1, -2, -1]])
    step = np.zeros((5, 6), np.float32)
    step[3:] = 1.0  # a horizontal edge: G_y answers 4, G_x nothing
    np.testing.assert_array_equal(arithmetic.apply_filter(step, "sobel_y"),
                                  [[0] * 4, [4] * 4, [4] * 4])
    np.testing.assert_array_equal(arithmetic.apply_filter(step, "sobel_x"), np.zeros((3, 4)))


def test_000_filter_table():
    """000, "Intuition of Filter" table: Identity, three Edge detection rows, Sharpen."""
    table = {"identity": [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
             "edge": [[1, 0, -1], [0, 0, 0], [-1, 0, 1]],
             "edge_laplace": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
             "edge_all": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
             "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]]}
    for name, matrix in table.items():
        np.testing.assert_array_equal(arithmetic.KERNELS[name], matrix, err_msg=name)
    image = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.testing.assert_array_equal(arithmetic.apply_filter(image, "identity"), image[1:-1, 1:-1])


def test_000_convolution_shrinks_4x4_to_2x2():
    """000, "Convolution 결과에 대한 고찰": a 4x4 input and a 3x3 filter give a 2x2 output."""
    assert arithmetic.conv_output_size(4, 3) == 2
    assert arithmetic.apply_filter(np.ones((4, 4)), np.ones((3, 3))).shape == (2, 2)


def test_000_zero_padding_keeps_4x4():
    """000, "Padding (zero padding)": the 4x4 input padded to 6x6 gives a 4x4 output."""
    assert arithmetic.conv_output_size(4, 3, padding=1) == 4
    out = arithmetic.apply_filter(np.ones((4, 4)), np.ones((3, 3)), padding=1)
    np.testing.assert_array_equal(out, [[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]])


def test_000_pooling_6x6():
    """000, "Pooling": the 6x6 example, window (2, 2), stride 2 (max and average; min is the
    third pooling of 002)."""
    np.testing.assert_array_equal(pool(layers.MaxPool, POOL6), [[3, 2, 3], [4, 4, 5], [2, 5, 3]])
    np.testing.assert_allclose(pool(layers.AvgPool, POOL6),
                               [[1.75, 1, 1.5], [2, 1.75, 2.5], [1.25, 3.5, 1.75]])
    np.testing.assert_array_equal(pool(layers.MinPool, POOL6), [[1, 0, 0], [0, 0, 1], [0, 1, 1]])


def test_000_output_size_table():
    """000, "Output size 계산": H = W = 4, P = 1, 3x3 filters, #F = 2 filters.

    (The slide prints the stride in the denominator as "c", and asks to adjust the "filter
    size" where the output size must come out a natural number.)"""
    assert arithmetic.conv_output_size(4, 3, 1, 1) == 4          # OH = OW = 4
    assert arithmetic.conv_output_size(4, 3, 3, 1) == 2          # stride 3: 2
    with pytest.raises(ValueError, match=r"\(4 - 3 \+ 2\*1\) / 2 \+ 1 = 2.5 is not an integer"):
        arithmetic.conv_output_size(4, 3, 2, 1)                  # stride 2: 2.5 (불가능)
    assert arithmetic.conv_output_size(4, 3, 2, 1, rounding="floor") == 2  # what torch computes
    assert arithmetic.leftover(4, 3, 2, 1) == 1                  # one padded row never read
    for stride, size, tiles in ((1, 4, True), (2, 2, False), (3, 2, True)):
        row = only_row(nn.Conv(2, (3, 3), strides=stride, padding=1), (4, 4, 1))
        assert row.output_shape == (size, size, 2)               # output channel = #F = 2
        assert row.tiles is tiles
    row = only_row(nn.Conv(2, (3, 3), strides=2, padding=1), (4, 4, 1))
    assert row.size_arithmetic == "(4 - 3 + 2*1) / 2 + 1 = 2.5 -> 2"
    lines = str(zoo.summary(nn.Conv(2, (3, 3), strides=2, padding=1), (4, 4, 1))).splitlines()
    assert [line.split()[-1] for line in lines if line.startswith("conv (Conv)")] == ["!"]
    assert any(line.startswith("! the windows do not tile") for line in lines)


TWO = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0],
                [0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], np.float32)
HORIZONTAL = [[1, 1, 1], [0, 0, 0], [0, 0, 0]]  # 가로 필터
DIAGONAL = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]    # 대각선 필터
VERTICAL = [[0, 0, 1], [0, 0, 1], [0, 0, 1]]    # 세로 필터


def features_of_two(kernel):
    """The slides' pipeline: 3x3 filter, bias -1, ReLU, 2x2 max pooling."""
    fmap = arithmetic.apply_filter(TWO, kernel, bias=-1.0)
    return np.asarray(fmap), np.asarray(pool(layers.MaxPool, jax.nn.relu(fmap)))


def test_000_mnist_two_horizontal_filter():
    """000, "Convolution 어떤 특징점을 찾을까?": the 6x6 "2" under the horizontal filter."""
    np.testing.assert_array_equal(arithmetic.apply_filter(TWO, HORIZONTAL),
                                  [[1, 2, 2, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    fmap, pooled = features_of_two(HORIZONTAL)
    # "bias -1 =" feature map 4x4 (the slide's last row prints "-1 n 0 n": n is 0)
    np.testing.assert_array_equal(fmap, [[0, 1, 1, 0], [0, 0, 0, 0], [-1, -1, 0, 0],
                                         [-1, 0, 0, 0]])
    np.testing.assert_array_equal(pooled, [[1, 1], [0, 0]])


def test_000_mnist_two_diagonal_filter():
    """000, "대각선 필터를 활용한 연산 결과": the diagonal filter's response."""
    np.testing.assert_array_equal(arithmetic.apply_filter(TWO, DIAGONAL),
                                  [[2, 1, 0, 1], [0, 0, 1, 2], [0, 0, 3, 0], [0, 3, 1, 1]])
    _, pooled = features_of_two(DIAGONAL)
    np.testing.assert_array_equal(pooled, [[1, 1], [2, 2]])


def test_000_mnist_two_vertical_filter():
    """000, "세로 필터를 활용한 연산 결과": Relu output and Max pooling output."""
    np.testing.assert_array_equal(arithmetic.apply_filter(TWO, VERTICAL),
                                  [[1, 1, 2, 0], [0, 1, 2, 0], [1, 1, 1, 0], [2, 2, 1, 0]])
    fmap, pooled = features_of_two(VERTICAL)
    # The slide's Relu output prints its second row as 0 0 1 1; the window at row 1, column 3
    # holds no 1 in its right column, so it is 0 0 1 0 (the pooled map is the same either way).
    np.testing.assert_array_equal(np.maximum(fmap, 0), [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0],
                                                        [1, 1, 0, 0]])
    np.testing.assert_array_equal(pooled, [[0, 1], [1, 0]])


def test_000_mnist_two_diagonal_wins():
    """000, "대각선 필터 값이 가장 높다!": the diagonal filter answers "2" the most."""
    peaks = {name: float(arithmetic.apply_filter(TWO, k).max())
             for name, k in (("horizontal", HORIZONTAL), ("diagonal", DIAGONAL),
                             ("vertical", VERTICAL))}
    assert peaks == {"horizontal": 2, "diagonal": 3, "vertical": 2}
    assert features_of_two(DIAGONAL)[1].max() == 2
    assert features_of_two(HORIZONTAL)[1].max() == features_of_two(VERTICAL)[1].max() == 1


def test_000_pytorch_encoder_sizes():
    """000, "CNN 구현 / Model 구조": BatchedCNNLayer's second conv (3x3, stride 2, padding 1)
    on 28x28, five times: 28 -> 14 -> 7 -> 4 -> 2 -> 1, as torch floors it."""
    with pytest.raises(ValueError, match=r"= 14.5 is not an integer"):
        arithmetic.conv_output_size(28, 3, 2, 1)
    sizes = [28]
    for _ in range(5):
        sizes.append(arithmetic.conv_output_size(sizes[-1], 3, 2, 1, rounding="floor"))
    assert sizes == [28, 14, 7, 4, 2, 1]
    rows = {r.name: r for r in zoo.summary("strided_cnn").rows}
    halving = [rows[f"cnn_encoder_{i}/conv2"] for i in range(5)]
    assert [r.output_shape for r in halving] == [(14, 14, 32), (7, 7, 64), (4, 4, 128),
                                                 (2, 2, 256), (1, 1, 512)]
    assert [r.tiles for r in halving] == [False, False, True, False, False]  # 14.5 7.5 4 2.5 1.5
    assert all(r.tiles for r in rows.values() if r.name.endswith("conv1"))   # padding 1 keeps


def test_000_pytorch_model_parameters():
    """000, CNNModel: BatchedCNNLayer(1, 32) ... (256, 512), then Linear(512, 200), Linear(200,
    10)."""
    widths = [1, 32, 64, 128, 256, 512]
    convs = sum(arithmetic.conv_param_count(3, a, b) + arithmetic.conv_param_count(3, b, b)
                for a, b in zip(widths, widths[1:]))
    total = convs + arithmetic.dense_param_count([512, 200, 10])
    assert total == zoo.summary("strided_cnn").total_params == 4_816_258


# ---------------------------------------------------------------- 001: cs231n Lecture 5

def test_001_fully_connected_layer():
    """001, "Fully Connected Layer": a 32x32x3 image stretched to 1x3072, times W, gives 1x10."""
    assert 32 * 32 * 3 == 3072
    assert arithmetic.dense_param_count([3072, 10], bias=False) == 30_720


def test_001_activation_maps():
    """001, "Convolution Layer": 32x32x3 image, 5x5x3 filter: a 28x28x1 activation map; six
    filters: 28x28x6."""
    assert arithmetic.conv_output_size(32, 5) == 28
    assert only_row(nn.Conv(1, (5, 5), padding=0), (32, 32, 3)).output_shape == (28, 28, 1)
    assert only_row(nn.Conv(6, (5, 5), padding=0), (32, 32, 3)).output_shape == (28, 28, 6)


def test_001_7x7_input_3x3_filter():
    """001, 7x7 input, 3x3 filter: stride 1 gives 5x5, stride 2 gives 3x3, stride 3 does not fit;
    output size (N - F) / stride + 1."""
    assert arithmetic.conv_output_size(7, 3, 1) == 5
    assert arithmetic.conv_output_size(7, 3, 2) == 3
    with pytest.raises(ValueError, match=r"\(7 - 3 \+ 2\*0\) / 3 \+ 1 = 2.33333 is not"):
        arithmetic.conv_output_size(7, 3, 3)


def test_001_zero_pad_makes_every_stride_fit():
    """001, "0-pad": with the right zeros, strides 1, 2 and 3 all fit the 7x7 input."""
    assert [arithmetic.conv_output_size(7, 3, s, 1) for s in (1, 2, 3)] == [7, 4, 3]
    assert all(arithmetic.leftover(7, 3, s, 1) == 0 for s in (1, 2, 3))


def test_001_unpadded_5x5_filters_shrink_by_4():
    """001, "한번 필터를 지나칠 때마다 사이즈가 4씩 감소": 32 -> 28 -> 24."""
    assert arithmetic.conv_output_size(32, 5) == 28
    assert arithmetic.conv_output_size(28, 5) == 24


def test_001_examples_time():
    """001, "Examples time": 32x32x3 input, ten 5x5 filters, stride 1, pad 2: 32x32x10 and 760
    parameters (76 per filter)."""
    assert 32 + 2 * 2 == 36 and 36 - 5 == 31               # the notes' steps
    assert arithmetic.conv_formula(32, 5, 1, 2) == "(32 - 5 + 2*2) / 1 + 1 = 32"
    assert arithmetic.conv_param_count(5, 3, 1) == 76
    assert arithmetic.conv_param_count(5, 3, 10) == 760
    row = only_row(nn.Conv(10, (5, 5), padding=2), (32, 32, 3))
    assert (row.output_shape, row.params) == ((32, 32, 10), 760)
    assert row.param_arithmetic == "(5*5*3 + 1) * 10 = 760"


def test_001_common_settings():
    """001, "Common settings": F=3,S=1,P=1; F=5,S=1,P=2; F=1,S=1,P=0 keep the size;
    F=5,S=2,P=? "whatever fits"."""
    for n in range(5, 65):
        assert arithmetic.conv_output_size(n, 3, 1, 1) == n
        assert arithmetic.conv_output_size(n, 5, 1, 2) == n
        assert arithmetic.conv_output_size(n, 1, 1, 0) == n
    # F=5, S=2: N - 5 + 2P is odd for an even N, so no padding fits a 32x32 input ...
    for p in range(5):
        with pytest.raises(ValueError, match="not an integer"):
            arithmetic.conv_output_size(32, 5, 2, p)
    # ... and every padding fits an odd one
    assert [arithmetic.conv_output_size(31, 5, 2, p) for p in range(3)] == [14, 15, 16]


def test_001_torch_floors():
    """001, "Example: CONV layer in Torch": owidth = floor((width + 2*padW - kW) / dW + 1),
    "several (of the last) columns or rows of the input image might be lost"; the zoo's Conv
    (its CPU fast path included) and pools compute the same floored sizes."""
    for width in range(1, 10):
        for k in range(1, 5):
            for s in range(1, 4):
                for p in range(2):
                    if width + 2 * p < k:
                        continue
                    floor = (width + 2 * p - k) // s + 1
                    assert arithmetic.conv_output_size(width, k, s, p, rounding="floor") == floor
                    lost = width + 2 * p - ((floor - 1) * s + k)
                    assert arithmetic.leftover(width, k, s, p) == lost
    for width, k, s, p in ((2, 3, 2, 1), (3, 1, 2, 0), (4, 3, 3, 1), (7, 3, 3, 0), (9, 5, 2, 1)):
        floor = arithmetic.conv_output_size(width, k, s, p, rounding="floor")
        conv = layers.Conv(2, (k, k), strides=s, padding=p)
        assert shape_of(conv, (width, width, 1)) == (floor, floor, 2)
        if p <= k // 2:
            assert shape_of(layers.MaxPool(k, s, p), (width, width, 1)) == (floor, floor, 1)


def test_001_torch_padw_default():
    """001, SpatialConvolution: "a good number is (kW-1)/2" keeps the width at dW = 1."""
    for kw in (1, 3, 5, 7, 11):
        assert arithmetic.conv_output_size(20, kw, 1, (kw - 1) // 2) == 20


def test_001_max_pooling():
    """001, "MAX POOLING": a 4x4 input, 2x2 filters at stride 2 give 2x2; W2 = (W1 - F)/S + 1,
    D2 = D1, and pooling has no parameters."""
    assert arithmetic.conv_output_size(4, 2, 2) == 2
    row = only_row(layers.MaxPool(2), (4, 4, 5))
    assert (row.output_shape, row.params) == ((2, 2, 5), 0)
    assert row.size_arithmetic == "(4 - 2 + 2*0) / 2 + 1 = 2"


def test_001_one_by_one_filters_change_the_depth():
    """001, "필터의 크기를 1x1로 하는 경우": same size, another depth."""
    row = only_row(nn.Conv(16, (1, 1), padding=0), (32, 32, 64))
    assert row.output_shape == (32, 32, 16)
    assert row.param_arithmetic == "(1*1*64 + 1) * 16 = 1,040"


# ---------------------------------------------------------------- 002: Keras MNIST notebook

def test_002_kernel_weights_against_full_connection():
    """002, "커널(kernel) or 필터(filter)": one neuron connected to every pixel of 28x28 needs
    784 weights, a 3x3 kernel 9."""
    assert arithmetic.dense_param_count([28 * 28, 1], bias=False) == 784
    assert arithmetic.conv_param_count(3, 1, 1, bias=False) == 9


def test_002_keras_table_row_by_row():
    """002, In [16] `model.summary()`: every row of the Keras table."""
    s = zoo.summary("simple_cnn")
    assert [(r.output_shape, r.params) for r in s.rows] == [
        ((28, 28, 32), 320), ((14, 14, 32), 0), ((14, 14, 64), 18_496), ((7, 7, 64), 0),
        ((7, 7, 64), 36_928), ((3, 3, 64), 0), ((576,), 0), ((64,), 36_928), ((10,), 650)]
    assert s.total_params == 93_322
    assert [r.receptive_field for r in s.rows[:6]] == [3, 4, 8, 10, 18, 22]
    text = str(s)
    assert "Total params: 93,322" in text and "(3, 3, 64)" in text


def test_002_keras_table_arithmetic():
    """002, L1 "32 (3 3) + 32(b) * 1 = 320", L2 "(32채널) 64(필터수) (3 3) + 64(b) 1 = 18496",
    "3 X 3 X 64 ... 576", and pool3's 7 -> 3, which floors 3.5 (the only '!' row)."""
    rows = {r.name: r for r in zoo.summary("simple_cnn", arithmetic=True).rows}
    assert rows["conv1"].size_arithmetic == "(28 - 3 + 2*1) / 1 + 1 = 28"
    assert rows["conv1"].param_arithmetic == "(3*3*1 + 1) * 32 = 320"
    assert rows["conv2"].param_arithmetic == "(3*3*32 + 1) * 64 = 18,496"
    assert rows["conv3"].param_arithmetic == "(3*3*64 + 1) * 64 = 36,928"
    assert rows["fc1"].param_arithmetic == "(576 + 1) * 64 = 36,928"
    assert rows["fc2"].param_arithmetic == "(64 + 1) * 10 = 650"
    assert rows["pool3"].size_arithmetic == "(7 - 2 + 2*0) / 2 + 1 = 3.5 -> 3"
    assert [name for name, r in rows.items() if not r.tiles] == ["pool3"]
    assert 3 * 3 * 64 == 576 == rows["flatten"].output_shape[0]
    assert arithmetic.dense_param_count([576, 64, 10]) == 36_928 + 650
    with pytest.raises(ValueError, match=r"= 3.5 is not an integer"):
        arithmetic.conv_output_size(7, 2, 2)
    assert arithmetic.conv_output_size(7, 2, 2, rounding="floor") == 3


def test_002_summary_cli_arithmetic(capsys):
    """002, the Keras table from the command line: `python -m zoo summary simple_cnn
    --arithmetic`."""
    from zoo.__main__ import main

    assert main(["summary", "simple_cnn", "--arithmetic"]) == 0
    out = capsys.readouterr().out
    assert "(28 - 3 + 2*1) / 1 + 1 = 28" in out and "(3*3*1 + 1) * 32 = 320" in out
    (pool3,) = [line for line in out.splitlines() if line.startswith("pool3")]
    assert pool3.endswith(" 22  !  (7 - 2 + 2*0) / 2 + 1 = 3.5 -> 3")  # RF, mark, size
    assert main(["summary", "simple_cnn"]) == 0
    assert "Size arithmetic" not in capsys.readouterr().out


def test_002_l2_needs_same_padding():
    """002, L2: its prose writes `Conv2D(64, (3, 3), padding="valid")`, but the table's
    (14, 14, 64) after it, and the model code, are padding="same"."""
    assert arithmetic.conv_output_size(14, 3, 1, 1) == 14   # "same" for 3x3 is P = 1
    valid = arithmetic.conv_output_size(14, 3, 1, 0)
    assert valid == 12 and arithmetic.conv_output_size(valid, 2, 2) == 6  # not the table's 7


def test_002_pooling_stride():
    """002, "Pooling": the slide writes MaxPooling2D(pool_size=(2, 2), strides=(1, 1)), which
    would give 27, not the table's 28 -> 14: Keras' default strides is the pool size, as the
    zoo's MaxPool's."""
    assert arithmetic.conv_output_size(28, 2, 1) == 27
    assert arithmetic.conv_output_size(28, 2, 2) == 14
    assert shape_of(layers.MaxPool(2), (28, 28, 32)) == (14, 14, 32)


def test_002_second_layer_kernel_shape():
    """002, "두번째 계층 구성": W2 is [3, 3, 32, 64]."""
    model = zoo.create_model("simple_cnn")
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    assert params["params"]["conv2"]["kernel"].shape == (3, 3, 32, 64)


def test_002_steps_per_epoch():
    """002, In [17] log "938/938" at batch 64 over 60,000 images, and "313/313" of
    `model.evaluate` (Keras' default batch 32) over 10,000: both count the partial batch. The
    zoo's training drops it: 937 steps an epoch."""
    assert arithmetic.steps_per_epoch(60_000, 64, drop_remainder=False) == 938
    assert arithmetic.steps_per_epoch(60_000, 64) == 937
    assert arithmetic.steps_per_epoch(10_000, 32, drop_remainder=False) == 313
    assert arithmetic.steps_per_epoch(60_000, 60_000) == 1
    assert arithmetic.steps_per_epoch(60, 64) == 0


def test_002_recipe_trains_on_mock_mnist():
    """002, the notes' run (Adam 1e-3, batch 64, 5 epochs, no augmentation) as the recipe
    `simple_cnn_mnist`: two steps on TFDS mock MNIST through the zoo's pipeline and train step."""
    import tensorflow_datasets as tfds

    from zoo import data, training

    recipe = training.RECIPES["simple_cnn_mnist"]
    assert (recipe.optimizer, recipe.lr, recipe.batch_size, recipe.epochs, recipe.augment) == (
        "adam", 1e-3, 64, 5, False)
    assert training.default_recipe_name("simple_cnn", "mnist") == "simple_cnn_mnist"
    info = zoo.model_info("simple_cnn")
    with tfds.testing.mock_data(num_examples=2 * recipe.batch_size):
        batches = data.make_dataset("mnist", "train", info=info, train=True,
                                    global_batch_size=recipe.batch_size, augment=recipe.augment)
        got = [next(batches) for _ in range(2)]
    steps = arithmetic.steps_per_epoch(60_000, recipe.batch_size)
    schedule = training.make_schedule(recipe, steps, int(recipe.epochs * steps),
                                      recipe.batch_size)
    state = training.create_train_state(zoo.create_model("simple_cnn"),
                                        training.make_optimizer(recipe, schedule), (28, 28, 1))
    step = jax.jit(training.train_step)
    for batch in got:
        assert batch["image"].shape == (64, 28, 28, 1)
        state, metrics = step(state, batch)
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))


# ---------------------------------------------------------------- 003: 모두의 딥러닝 Lec 10

def test_003_output_size_example():
    """003: n - f + 1 without padding; a 3x3x3 filter over a 3x4x4 input with p = 1 and s = 1:
    (4 - 3 + 2) / 1 + 1 = 4."""
    assert arithmetic.conv_output_size(4, 3) == 4 - 3 + 1
    assert arithmetic.conv_formula(4, 3, 1, 1) == "(4 - 3 + 2*1) / 1 + 1 = 4"
    assert only_row(nn.Conv(10, (3, 3), padding=1), (4, 4, 3)).output_shape == (4, 4, 10)


def test_003_ten_filters():
    """003: ten 3x3x3 filters: "3 x 3 x 3 x 10 = 270" parameters θ. The slide counts the
    weights only; with each filter's bias (as 001 counts them) the layer has 280."""
    assert arithmetic.conv_param_count(3, 3, 10, bias=False) == 270
    assert only_row(nn.Conv(10, (3, 3), padding=1), (4, 4, 3)).params == 280


def test_003_pooling_halves():
    """003, "Max Pooling의 경우 2 x 2 커널과 2 stride": the feature map's size halves."""
    for n in (4, 14, 28, 224):
        assert arithmetic.conv_output_size(n, 2, 2) == n // 2
        assert shape_of(layers.MaxPool(2), (n, n, 1)) == (n // 2, n // 2, 1)


# ---------------------------------------------------------------- 004: computer vision slides

def test_004_bike_filters():
    """004, "Filter?": 1/5 (1 1 [1] 1 1) across and down, the 1/25 5x5 box filter, and the
    sharpen 1/4 (0 -1 0; -1 [8] -1; 0 -1 0)."""
    k = arithmetic.KERNELS
    np.testing.assert_allclose(k["blur_horizontal"], np.full((1, 5), 1 / 5), rtol=EPS)
    np.testing.assert_allclose(k["blur_vertical"], np.full((5, 1), 1 / 5), rtol=EPS)
    np.testing.assert_allclose(k["box_blur_5x5"], np.full((5, 5), 1 / 25), rtol=EPS)
    np.testing.assert_array_equal(4 * k["sharpen_quarter"], [[0, -1, 0], [-1, 8, -1], [0, -1, 0]])
    assert k["sharpen_quarter"].sum() == 1  # (8 - 4) / 4: keeps the brightness
    image = np.arange(7 * 9, dtype=np.float32).reshape(7, 9)
    across = arithmetic.apply_filter(image, "blur_horizontal", padding=(0, 2))
    assert across.shape == (7, 9)  # per-axis padding keeps the size under a 1x5 kernel
    np.testing.assert_allclose(across[:, 2:-2], image[:, 2:-2], rtol=4 * EPS)  # a linear ramp
    down = arithmetic.apply_filter(image, "blur_vertical", padding="same")
    assert down.shape == (7, 9)
    np.testing.assert_allclose(down[2:-2], image[2:-2], rtol=4 * EPS)
    box = arithmetic.apply_filter(image, "box_blur_5x5", padding=2)
    np.testing.assert_allclose(box[2:-2, 2:-2], image[2:-2, 2:-2], rtol=16 * EPS)


def test_004_bike_sharpened_worked_example():
    """004, "Filter?" worked windows. The slide multiplies each window by the unscaled kernel
    (8 in the centre) and prints the products; the sums are 48 and -12, and the quarter-scaled
    filter it names answers 12 and -3 (the two windows are neighbours in one 3x4 patch)."""
    patch = np.array([[18, 8, 9, 6], [19, 12, 7, 17], [13, 14, 30, 12]], np.float32)
    unscaled = 4 * arithmetic.KERNELS["sharpen_quarter"]
    np.testing.assert_array_equal(patch[:, :3] * unscaled, [[0, -8, 0], [-19, 96, -7],
                                                            [0, -14, 0]])
    np.testing.assert_array_equal(patch[:, 1:] * unscaled, [[0, -9, 0], [-12, 56, -17],
                                                            [0, -30, 0]])
    np.testing.assert_array_equal(arithmetic.apply_filter(patch, unscaled), [[48, -12]])
    np.testing.assert_array_equal(arithmetic.apply_filter(patch, "sharpen_quarter"), [[12, -3]])


def test_004_convolution_of_a_3x3x3_input():
    """004, "Convolution": a 2x2x3 filter over a 3x3x3 input gives a 2x2x1 activation map, and
    y1 = w1x1 + w2x2 + w4x4 + w5x5 + w10x10 + ... + w23x23 (x numbered 1..27, channel by
    channel, row by row)."""
    assert arithmetic.conv_output_size(3, 2) == 2
    numbers = (9 * jnp.arange(3) + 3 * jnp.arange(3)[:, None, None] +
               jnp.arange(3)[None, :, None] + 1).astype(jnp.float32)  # (H, W, C): x_k = k
    conv = nn.Conv(1, (2, 2), padding=0, use_bias=False, precision=jax.lax.Precision.HIGHEST)
    kernel = numbers[:2, :2, :, None]  # w_k = k at the first window's positions
    y = conv.apply({"params": {"kernel": kernel}}, numbers[None])
    assert y.shape == (1, 2, 2, 1)
    assert float(y[0, 0, 0, 0]) == sum(k * k for k in (1, 2, 4, 5, 10, 11, 13, 14, 19, 20, 22, 23))
    assert only_row(conv, (3, 3, 3)).params == 12  # the twelve w's


def test_004_why_cnn_dense_weights():
    """004, "Why Convolution neural network?": 16 x 4 + 4 x 2 = 72, and a 224x224 input through
    1024, 2048, 4096 hidden nodes into 1000 classes: 65,961,984 weights."""
    assert arithmetic.dense_param_count([16, 4, 2], bias=False) == 72
    assert 224 * 224 == 50_176
    assert arithmetic.dense_param_count([50_176, 1024, 2048, 4096, 1000], bias=False) == 65_961_984


def test_004_why_cnn_conv_weights():
    """004: "9 x 128 + 9 x 256 + 9 x 512 + 1024 x 1000 = 1,032,064". The slide gives each
    filter 3x3 = 9 weights, i.e. a depth of 1; with the depths of the stack (3 -> 128 -> 256 ->
    512, F*F*D per filter as 001 says) the three convolutions alone have 1,478,016."""
    slide = sum(arithmetic.conv_param_count(3, 1, k, bias=False) for k in (128, 256, 512))
    assert slide + arithmetic.dense_param_count([1024, 1000], bias=False) == 1_032_064
    depths = [3, 128, 256, 512]
    assert sum(arithmetic.conv_param_count(3, a, b, bias=False)
               for a, b in zip(depths, depths[1:])) == 1_478_016


def test_004_fully_connected_3x3x3():
    """004, "Fully connected layer": a 3x3x3 image flattened to 27 values, Wx with 10 x 27
    weights."""
    assert arithmetic.dense_param_count([3 * 3 * 3, 10], bias=False) == 270


def test_004_stride_and_padding_7x7():
    """004, "Convolution layer stride / padding", "Filter size formula": 7x7 image, 3x3
    filter: stride 1 -> 5, 2 -> 3, 3 -> 2.33 (does not fit); padding 1: stride 1 -> 7, stride 2
    -> 4. (The extracted padded grid is drawn 10 cells wide and 9 high; 7 + 2*1 is 9 both.)"""
    assert [arithmetic.conv_output_size(7, 3, s) for s in (1, 2)] == [5, 3]
    with pytest.raises(ValueError, match=r"2.33333 is not an integer"):
        arithmetic.conv_output_size(7, 3, 3)
    assert arithmetic.conv_output_size(7, 3, 3, rounding="floor") == 2
    assert [arithmetic.conv_output_size(7, 3, s, 1) for s in (1, 2)] == [7, 4]
    assert arithmetic.apply_filter(np.ones((7, 7)), "identity", padding=1).shape == (7, 7)


def test_004_pooling_4x4():
    """004, "Convolution layer pooling": max and average pooling, 2x2 pool size.

    The 4x4 slide prints max [[100, 184], [12, 45]] and average [[36, 80], [12, 15]]; the exact
    mean of its first window (31 + 15 + 0 + 100) / 4 is 36.5 (the slide rounds it down)."""
    np.testing.assert_array_equal(pool(layers.MaxPool, POOL4), [[100, 184], [12, 45]])
    np.testing.assert_allclose(pool(layers.AvgPool, POOL4), [[36.5, 80], [12, 15]])
    np.testing.assert_array_equal(pool(layers.MinPool, POOL4), [[0, 28], [12, 2]])
    # The max-pooling slide's matrix starts with 29 where the average slide's has 31; with
    # 29 the first window's mean is exactly the printed 36.
    with_29 = POOL4.copy()
    with_29[0, 0] = 29
    np.testing.assert_array_equal(pool(layers.AvgPool, with_29), [[36, 80], [12, 15]])
    np.testing.assert_array_equal(pool(layers.MaxPool, with_29), [[100, 184], [12, 45]])


def test_004_receptive_field():
    """004, "Receptive field": one 3x3 layer sees 3x3, two stacked see 5x5."""
    assert arithmetic.receptive_field([(3, 1)]) == 3
    assert arithmetic.receptive_field([(3, 1), (3, 1)]) == 5

    class TwoConvs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(1, (3, 3), padding=1)(nn.Conv(1, (3, 3), padding=1)(x))

    assert [r.receptive_field for r in zoo.summary(TwoConvs(), (9, 9, 1)).rows] == [3, 5]


def test_004_model_sizes_and_errors():
    """004: LeNet-5 "Parameter size ≈ 60,000", AlexNet ≈ 62,000,000, VGG (16, D) ≈ 138,000,000;
    top-5 errors 15.3% (AlexNet), 7.5% (VGG), 6.7% (GoogLeNet), 3.57% (ResNet)."""
    assert round(zoo.summary("lenet5").total_params, -4) == 60_000
    assert round(zoo.summary("alexnet_lrn").total_params, -6) == 62_000_000
    assert round(zoo.summary("vgg16").total_params, -6) == 138_000_000
    errors = {name: zoo.model_info(name).paper_top5_error
              for name in ("alexnet", "alexnet_lrn", "vgg16", "googlenet", "resnet152")}
    assert errors == {"alexnet": 15.3, "alexnet_lrn": 15.3, "vgg16": 7.5, "googlenet": 6.7,
                      "resnet152": 3.57}


def test_004_alexnet_table():
    """004, "Full (simplified) AlexNet architecture": every volume of the table, at 227x227x3."""
    s = zoo.summary("alexnet_lrn")
    volumes = [(r.kind, r.output_shape) for r in s.rows if r.kind != "Dropout"]
    assert volumes == [
        ("Conv", (55, 55, 96)), ("MaxPool", (27, 27, 96)), ("LocalResponseNorm", (27, 27, 96)),
        ("Conv", (27, 27, 256)), ("MaxPool", (13, 13, 256)), ("LocalResponseNorm", (13, 13, 256)),
        ("Conv", (13, 13, 384)), ("Conv", (13, 13, 384)), ("Conv", (13, 13, 256)),
        ("MaxPool", (6, 6, 256)), ("Flatten", (9216,)), ("Dense", (4096,)), ("Dense", (4096,)),
        ("Dense", (1000,))]
    assert all(r.tiles for r in s.rows)  # at 227 every window tiles ...
    with pytest.raises(ValueError, match=r"\(224 - 11 \+ 2\*0\) / 4 \+ 1 = 54.25"):
        arithmetic.conv_output_size(224, 11, 4)  # ... at 224 CONV1 would not
    conv1 = zoo.summary("alexnet").rows[0]  # torchvision's AlexNet pads 2 at 224 and floors
    assert conv1.size_arithmetic == "(224 - 11 + 2*2) / 4 + 1 = 55.25 -> 55" and not conv1.tiles


@pytest.mark.parametrize("name,weight_layers", [("vgg_a", 11), ("vgg_a_lrn", 11), ("vgg_b", 13),
                                                ("vgg_c", 16), ("vgg_d", 16), ("vgg_e", 19)])
def test_004_vgg_configurations(name, weight_layers):
    """004, "VGG" ConvNet Configuration table: 11, 11, 13, 16, 16 and 19 weight layers; C's
    conv1 layers are 1x1."""
    rows = zoo.summary(name).rows
    assert sum(r.kind in ("Conv", "Dense") for r in rows) == weight_layers
    ones = [r for r in rows if r.param_arithmetic and r.param_arithmetic.startswith("(1*1*")]
    assert len(ones) == (3 if name == "vgg_c" else 0)
    assert ("LocalResponseNorm" in {r.kind for r in rows}) == (name == "vgg_a_lrn")


# ---------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_error_each():
    image = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(7 - 3 \+ 2\*0\) / 3 \+ 1 = 2.33333 is not an "
                                         r"integer.*floor it to 2"):
        arithmetic.conv_output_size(7, 3, 3)
    with pytest.raises(ValueError, match=r"a filter of 5 is larger than the padded input: "
                                         r"3 \+ 0 \+ 0 = 3 < 5"):
        arithmetic.conv_output_size(3, 5)
    with pytest.raises(ValueError, match=r"a 5x5 kernel is larger than the 3x3 image padded "
                                         r"to 3x3"):
        arithmetic.apply_filter(image, "box_blur_5x5")
    with pytest.raises(ValueError, match=r"unknown kernel 'sharpn'; KERNELS has .*sharpen"):
        arithmetic.apply_filter(image, "sharpn")
    with pytest.raises(ValueError, match=r"padding must not be negative, got -1"):
        arithmetic.conv_output_size(7, 3, padding=-1)
    with pytest.raises(ValueError, match=r"padding must not be negative, got -1 "
                                         r"\(in padding=\(0, -1\)\)"):
        arithmetic.apply_filter(image, "identity", padding=(0, -1))
    with pytest.raises(ValueError, match=r"rounding must be one of exact, floor, not 'ceil'"):
        arithmetic.conv_output_size(7, 3, rounding="ceil")
    with pytest.raises(ValueError, match=r"the stride must be a positive integer, not 0"):
        arithmetic.conv_output_size(7, 3, 0)
    with pytest.raises(ValueError, match=r"needs the input width and at least one"):
        arithmetic.dense_param_count([784])
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, not 0"):
        arithmetic.steps_per_epoch(60_000, 0)
