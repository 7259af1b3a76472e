// oneDNN's convolutions as XLA FFI handlers for zoo.onednn: NHWC x HWIO float32, explicit
// strides and paddings; forward, input gradient and weight gradient.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A convolution's geometry: N, H, W, C, Ho, Wo, K, kh, kw, strides and paddings.
using Geometry = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t>;

// The three primitives of one geometry; the weights in oneDNN's layout of choice.
struct Primitives {
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_backward_data::primitive_desc data_pd;
  dnnl::convolution_backward_weights::primitive_desc weights_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data data;
  dnnl::convolution_backward_weights weights;
  memory::desc hwio;
};

std::shared_ptr<const Primitives> Get(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Geometry, std::shared_ptr<const Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(g);
  if (found != cache.end()) return found->second;
  auto [n, h, w, c, ho, wo, k, kh, kw, sh, sw, ph0, ph1, pw0, pw1] = g;
  auto f32 = memory::data_type::f32;
  memory::desc src({n, c, h, w}, f32, Tag::nhwc), dst({n, k, ho, wo}, f32, Tag::nhwc);
  memory::desc any({k, c, kh, kw}, f32, Tag::any);
  memory::dims strides{sh, sw}, left{ph0, pw0}, right{ph1, pw1};
  auto direct = dnnl::algorithm::convolution_direct;
  // each call brings its own scratchpad (Scratchpad below): XLA runs independent
  // convolutions concurrently, and the library's shared one is not safe for that
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto p = std::make_shared<Primitives>();
  p->forward_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, direct, src, any, dst,
                                      strides, left, right), attr, Engine());
  p->data_pd = dnnl::convolution_backward_data::primitive_desc(
      dnnl::convolution_backward_data::desc(direct, src, any, dst, strides, left, right),
      attr, Engine(), p->forward_pd);
  p->weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      dnnl::convolution_backward_weights::desc(direct, src, any, dst, strides, left, right),
      attr, Engine(), p->forward_pd);
  p->forward = dnnl::convolution_forward(p->forward_pd);
  p->data = dnnl::convolution_backward_data(p->data_pd);
  p->weights = dnnl::convolution_backward_weights(p->weights_pd);
  p->hwio = memory::desc({k, c, kh, kw}, f32, Tag::hwio);
  cache.emplace(g, p);
  return p;
}

// The HWIO weights at `data` in the layout `want`: a view where it is HWIO, else a reorder.
memory Weights(const Primitives& p, const memory::desc& want, void* data, dnnl::stream& s) {
  memory hwio(p.hwio, Engine(), data);
  if (want == p.hwio) return hwio;
  memory out(want, Engine());
  dnnl::reorder(hwio, out).execute(s, hwio, out);
  return out;
}

// A scratchpad of `desc`'s size, owned by the calling thread (which runs one primitive at a
// time) and grown as needed.
memory Scratchpad(const memory::desc& desc) {
  thread_local std::vector<char> buffer;
  if (buffer.size() < desc.get_size()) buffer.resize(desc.get_size());
  return memory(desc, Engine(), buffer.data());
}

// Runs `primitive` (described by `pd`) on `args` in `s`, with the calling thread's scratchpad.
template <typename PrimitiveDesc>
void Execute(const dnnl::primitive& primitive, const PrimitiveDesc& pd, dnnl::stream& s,
             std::unordered_map<int, memory> args) {
  args.emplace(DNNL_ARG_SCRATCHPAD, Scratchpad(pd.scratchpad_desc()));
  primitive.execute(s, args);
}

template <typename F>
ffi::Error Run(F&& f) {
  try {
    f();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
}

// x (N, H, W, C), w (kh, kw, C, K) -> y (N, Ho, Wo, K)
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t sh, int64_t sw, int64_t ph0, int64_t ph1, int64_t pw0, int64_t pw1) {
  return Run([&] {
    auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
    auto p = Get({xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[3], wd[0], wd[1],
                  sh, sw, ph0, ph1, pw0, pw1});
    const auto& pd = p->forward_pd;
    dnnl::stream s(Engine());
    Execute(p->forward, pd, s,
            {{DNNL_ARG_SRC, memory(pd.src_desc(), Engine(), x.typed_data())},
             {DNNL_ARG_WEIGHTS, Weights(*p, pd.weights_desc(), w.typed_data(), s)},
             {DNNL_ARG_DST, memory(pd.dst_desc(), Engine(), y->typed_data())}});
    s.wait();
  });
}

// g (N, Ho, Wo, K), w (kh, kw, C, K) -> dx (N, H, W, C)
ffi::Error InputGrad(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t ph0,
                     int64_t ph1, int64_t pw0, int64_t pw1) {
  return Run([&] {
    auto gd = g.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
    auto p = Get({xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], wd[3], wd[0], wd[1],
                  sh, sw, ph0, ph1, pw0, pw1});
    const auto& pd = p->data_pd;
    dnnl::stream s(Engine());
    Execute(p->data, pd, s,
            {{DNNL_ARG_DIFF_DST, memory(pd.diff_dst_desc(), Engine(), g.typed_data())},
             {DNNL_ARG_WEIGHTS, Weights(*p, pd.weights_desc(), w.typed_data(), s)},
             {DNNL_ARG_DIFF_SRC, memory(pd.diff_src_desc(), Engine(), dx->typed_data())}});
    s.wait();
  });
}

// x (N, H, W, C), g (N, Ho, Wo, K) -> dw (kh, kw, C, K)
ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t ph0,
                      int64_t ph1, int64_t pw0, int64_t pw1) {
  return Run([&] {
    auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
    auto p = Get({xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], wd[3], wd[0], wd[1],
                  sh, sw, ph0, ph1, pw0, pw1});
    const auto& pd = p->weights_pd;
    dnnl::stream s(Engine());
    memory hwio(p->hwio, Engine(), dw->typed_data());
    bool direct = pd.diff_weights_desc() == p->hwio;
    memory dwm = direct ? hwio : memory(pd.diff_weights_desc(), Engine());
    Execute(p->weights, pd, s,
            {{DNNL_ARG_SRC, memory(pd.src_desc(), Engine(), x.typed_data())},
             {DNNL_ARG_DIFF_DST, memory(pd.diff_dst_desc(), Engine(), g.typed_data())},
             {DNNL_ARG_DIFF_WEIGHTS, dwm}});
    if (!direct) dnnl::reorder(dwm, hwio).execute(s, dwm, hwio);
    s.wait();
  });
}

}  // namespace

#define ZOO_CONV_BINDING                                                                    \
  ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()               \
      .Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("sh").Attr<int64_t>("sw")                 \
      .Attr<int64_t>("ph0").Attr<int64_t>("ph1").Attr<int64_t>("pw0").Attr<int64_t>("pw1")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooConvForward, Forward, ZOO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooConvInputGrad, InputGrad, ZOO_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooConvWeightGrad, WeightGrad, ZOO_CONV_BINDING);

extern "C" const char* zoo_onednn_version() {
  static std::string v = [] {
    const dnnl_version_t* d = dnnl_version();
    return std::to_string(d->major) + "." + std::to_string(d->minor) + "." +
           std::to_string(d->patch);
  }();
  return v.c_str();
}
