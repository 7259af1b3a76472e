# The two set-up commands of the README:
#   make train   venv + offline Fashion-MNIST + train simple_cnn + evaluate it (prints the accuracy)
#                (the venv step also installs oneDNN where apt-get may: zoo.onednn)
#   make test    venv with the test extras + the whole test suite (what CI runs)
PY := .venv/bin/python
# torch for weight conversion tests: the light CPU build this machine kind carries (see README)
TORCH := $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.13.0 torchvision==0.28.0)
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: train test data
train: .venv/.base data
	$(PY) train.py --model simple_cnn --dataset fashion_mnist --workdir runs/simple_cnn_fashion_mnist
	$(PY) evaluate.py --model simple_cnn --checkpoint runs/simple_cnn_fashion_mnist --dataset fashion_mnist

test: .venv/.test data
	.venv/bin/python -m pytest

data: .venv/.base
	$(PY) -m zoo data prepare fashion_mnist

.venv/.base: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@# oneDNN's CPU convolutions (zoo.onednn): Debian's libdnnl-dev, where apt-get may install it
	@test -e /usr/include/oneapi/dnnl/dnnl.hpp || [ "$$(id -u)" != 0 ] || \
	  ! command -v apt-get >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq libdnnl-dev >/dev/null) || echo "could not install libdnnl-dev"
	$(PY) -c "from zoo import onednn; print('CPU convolutions:', onednn.status())"
	touch $@

.venv/.test: .venv/.base
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,torch]"
	touch $@
