// C++ test of the sparks ops through the dispatcher, against a float reference built from ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>

namespace {

at::Tensor reference(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& indices,
                     int64_t stride, int64_t padding, int64_t groups, double pad_value) {
  at::Tensor xb = at::where(x >= 0, 1.0, -1.0).to(at::kDouble);
  xb = at::constant_pad_nd(xb, {padding, padding, padding, padding}, pad_value);
  at::Tensor w = codebook.to(at::kDouble).index({indices.to(at::kLong)});
  const int64_t s[2] = {stride, stride}, p[2] = {0, 0}, d[2] = {1, 1};
  return at::conv2d(xb, w, at::Tensor(), s, p, d, groups).to(x.scalar_type());
}

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("sparks::conv2d", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, double,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  at::manual_seed(0);
  for (double pad_value : {0.0, 1.0, -1.0}) {
    for (int64_t stride : {1, 2}) {
      for (int64_t groups : {1, 4}) {
        at::Tensor x = at::randn({2, 8, 11, 11});
        at::Tensor codebook = at::randint(-1, 2, {32, 3, 3}, at::kChar);
        at::Tensor indices = at::randint(0, 32, {12, 8 / groups}, at::kInt);
        at::Tensor out = op.call(x, codebook, indices, std::nullopt, std::nullopt, {stride, stride},
                                 {1, 1}, {1, 1}, groups, pad_value, std::nullopt, std::nullopt,
                                 std::nullopt, std::nullopt);
        at::Tensor ref = reference(x, codebook, indices, stride, 1, groups, pad_value);
        check(at::equal(out, ref), "conv2d pad_value=" + std::to_string(pad_value) +
                                       " stride=" + std::to_string(stride) +
                                       " groups=" + std::to_string(groups));
      }
    }
  }
  // Bad input raises a c10::ValueError naming the argument.
  bool raised = false;
  try {
    op.call(at::randn({1, 4, 5, 5}), at::ones({4, 3, 3}, at::kChar), at::full({4, 4}, 7, at::kInt),
            std::nullopt, std::nullopt, {1, 1}, {0, 0}, {1, 1}, 1, 0.0, std::nullopt, std::nullopt,
            std::nullopt, std::nullopt);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("indices must lie in") != std::string::npos;
  }
  check(raised, "out-of-range index raises ValueError naming indices");
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
