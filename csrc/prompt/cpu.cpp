// Prompt-encoding kernels (CPU): prompt assembly, shared-prefix causal attention, EOT head.
// Schemas are declared here for every device; the CUDA implementations live in cuda.cu.
//
// Packed suffix layout (see dgkernels/prompt/text_tower.py, PackedLayout): sequence n owns rows
// seq_start[n] .. seq_start[n] + seq_len[n] of q/k/v [T, H, d] and reads the prefix keys/values
// kp/vp[seq_group[n]] ([G, Lp, H, d]). Query t of sequence n attends to all Lp prefix positions
// and to its own positions 0..t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace dgkernels {
namespace prompt {

TORCH_LIBRARY_FRAGMENT(dgkernels, m) {
  m.def("prompt_assemble(Tensor src, Tensor src_index, Tensor pos, Tensor pos_index, ScalarType dtype) -> Tensor");
  m.def("prompt_index_add_rows(Tensor grad, Tensor index, int rows) -> Tensor");
  m.def(
      "prompt_prefix_attention(Tensor q, Tensor k, Tensor v, Tensor kp, Tensor vp, Tensor seq_start, "
      "Tensor seq_len, Tensor seq_group, int max_len, float scale) -> (Tensor, Tensor)");
  m.def(
      "prompt_prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor kp, Tensor vp, "
      "Tensor out, Tensor lse, Tensor seq_start, Tensor seq_len, Tensor seq_group, int max_len, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prompt_eot_head(Tensor x, Tensor rows, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor? proj, "
      "Tensor? proj_bias, bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prompt_eot_head_backward(Tensor grad_out, Tensor x, Tensor rows, Tensor? ln_weight, float eps, Tensor? proj, "
      "Tensor y, Tensor z, Tensor mean, Tensor rstd, bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's default

// ------------------------------------------------------------------------------------------------
// assembly: out[t] = src[src_index[t]].to(dtype) + pos[pos_index[t]].to(dtype)
// ------------------------------------------------------------------------------------------------
at::Tensor assemble_cpu(const at::Tensor& src, const at::Tensor& src_index, const at::Tensor& pos,
                        const at::Tensor& pos_index, at::ScalarType dtype) {
  DGK_CHECK_DIM(src, 2, "src");
  DGK_CHECK_DIM(pos, 2, "pos");
  TORCH_CHECK(src.size(1) == pos.size(1), "src width ", src.size(1), " != pos width ", pos.size(1));
  TORCH_CHECK(src_index.numel() == pos_index.numel(), "src_index and pos_index lengths differ");
  const int64_t t = src_index.numel(), w = src.size(1);
  auto sidx = src_index.to(at::kLong).contiguous();
  auto pidx = pos_index.to(at::kLong).contiguous();
  const int64_t srows = src.size(0), prows = pos.size(0);
  const int64_t* si = sidx.data_ptr<int64_t>();
  const int64_t* pi = pidx.data_ptr<int64_t>();
  for (int64_t r = 0; r < t; ++r) {
    TORCH_CHECK(si[r] >= 0 && si[r] < srows && pi[r] >= 0 && pi[r] < prows, "prompt_assemble: index out of range");
  }
  // Gather, then cast (as open_clip: token_embedding(text).to(cast) + pos.to(cast)) and add in
  // `dtype`; gathering first never converts a whole embedding table.
  auto s = src.index_select(0, sidx).to(dtype).contiguous();
  auto p = pos.to(dtype).contiguous();
  auto out = at::empty({t, w}, src.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "prompt_assemble", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* a = sp + r * w;
        const scalar_t* c = pp + pi[r] * w;
        scalar_t* o = op + r * w;
        for (int64_t j = 0; j < w; ++j) o[j] = static_cast<scalar_t>(a[j] + c[j]);
      }
    });
  });
  return out;
}

// out[index[r]] += grad[r], float32 (float64 for float64 grads); deterministic: threads own columns.
at::Tensor index_add_rows_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t rows) {
  DGK_CHECK_DIM(grad, 2, "grad");
  TORCH_CHECK(index.numel() == grad.size(0), "index has ", index.numel(), " entries for ", grad.size(0), " rows");
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto g = grad.to(acc).contiguous();
  auto idx = index.to(at::kLong).contiguous();
  const int64_t t = g.size(0), w = g.size(1);
  auto out = at::zeros({rows, w}, g.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < t; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < rows, "prompt_index_add_rows: index out of range");
  AT_DISPATCH_FLOATING_TYPES(acc, "prompt_index_add_rows", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, w, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t r = 0; r < t; ++r) {
        const scalar_t* a = gp + r * w;
        scalar_t* o = op + ip[r] * w;
        for (int64_t j = c0; j < c1; ++j) o[j] += a[j];
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// shared-prefix attention
// ------------------------------------------------------------------------------------------------
struct View3 {  // a [rows, H, d] tensor with unit stride in d
  int64_t s0, s1;
};
struct View4 {  // [G, Lp, H, d]
  int64_t s0, s1, s2;
};

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kp,
                            const at::Tensor& vp, const at::Tensor& seq_start, const at::Tensor& seq_len,
                            const at::Tensor& seq_group) {
  DGK_CHECK_DIM(q, 3, "q");
  DGK_CHECK_DIM(kp, 4, "kp");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k, v must share the shape [T, H, d], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(vp.sizes() == kp.sizes(), "kp and vp must share the shape [G, Lp, H, d]");
  TORCH_CHECK(kp.size(2) == q.size(1) && kp.size(3) == q.size(2), "prefix heads/dim ", kp.sizes(),
              " do not match q ", q.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == kp.scalar_type() && q.scalar_type() == vp.scalar_type(),
              "q, k, v, kp, vp must share one dtype");
  TORCH_CHECK(seq_start.numel() == seq_len.numel() && seq_group.numel() == seq_len.numel(),
              "seq_start, seq_len, seq_group must have one entry per sequence");
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename scalar_t>
void attention_forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, View3 vq, View3 vk, View3 vv,
                              const scalar_t* kp, const scalar_t* vp, View4 vkp, View4 vvp, const int64_t* start,
                              const int64_t* len, const int64_t* group, int64_t n, int64_t heads, int64_t dim,
                              int64_t lp, int64_t max_len, double scale, scalar_t* out, float* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n * heads, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> s(lp + max_len), o(dim), qr(dim);
    for (int64_t job = b; job < e; ++job) {
      const int64_t seq = job / heads, h = job % heads;
      const int64_t r0 = start[seq], L = len[seq], g = group[seq];
      for (int64_t t = 0; t < L; ++t) {
        const scalar_t* qt = q + (r0 + t) * vq.s0 + h * vq.s1;
        for (int64_t c = 0; c < dim; ++c) qr[c] = static_cast<acc_t>(qt[c]) * static_cast<acc_t>(scale);
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < lp + t + 1; ++j) {
          const scalar_t* kj = j < lp ? kp + g * vkp.s0 + j * vkp.s1 + h * vkp.s2 : k + (r0 + j - lp) * vk.s0 + h * vk.s1;
          acc_t acc = 0;
          for (int64_t c = 0; c < dim; ++c) acc += qr[c] * static_cast<acc_t>(kj[c]);
          s[j] = acc;
          mx = std::max(mx, acc);
        }
        acc_t sum = 0;
        for (int64_t j = 0; j < lp + t + 1; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t j = 0; j < lp + t + 1; ++j) {
          const scalar_t* vj = j < lp ? vp + g * vvp.s0 + j * vvp.s1 + h * vvp.s2 : v + (r0 + j - lp) * vv.s0 + h * vv.s1;
          const acc_t p = s[j] / sum;
          for (int64_t c = 0; c < dim; ++c) o[c] += p * static_cast<acc_t>(vj[c]);
        }
        scalar_t* ot = out + ((r0 + t) * heads + h) * dim;
        for (int64_t c = 0; c < dim; ++c) ot[c] = static_cast<scalar_t>(o[c]);
        lse[(r0 + t) * heads + h] = static_cast<float>(mx + std::log(sum));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& kp_in,
                                                        const at::Tensor& vp_in, const at::Tensor& seq_start,
                                                        const at::Tensor& seq_len, const at::Tensor& seq_group,
                                                        int64_t max_len, double scale) {
  check_attention_inputs(q_in, k_in, v_in, kp_in, vp_in, seq_start, seq_len, seq_group);
  auto q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in), kp = unit_last(kp_in), vp = unit_last(vp_in);
  auto st = seq_start.to(at::kLong).contiguous(), ln = seq_len.to(at::kLong).contiguous(),
       gr = seq_group.to(at::kLong).contiguous();
  const int64_t t = q.size(0), heads = q.size(1), dim = q.size(2), lp = kp.size(1), n = ln.numel();
  auto out = at::empty({t, heads, dim}, q.options());
  auto lse = at::empty({t, heads}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prompt_prefix_attention", [&] {
    attention_forward_kernel<scalar_t>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), {q.stride(0), q.stride(1)},
        {k.stride(0), k.stride(1)}, {v.stride(0), v.stride(1)}, kp.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>(),
        {kp.stride(0), kp.stride(1), kp.stride(2)}, {vp.stride(0), vp.stride(1), vp.stride(2)},
        st.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), gr.data_ptr<int64_t>(), n, heads, dim, lp, max_len, scale,
        out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

// Backward: threads own (group, head) pairs, so each writes the prefix gradients of its group and
// the suffix gradients of that group's sequences with no races and a fixed summation order.
template <typename scalar_t>
void attention_backward_kernel(const scalar_t* go, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                               View3 vq, View3 vk, View3 vv, const scalar_t* kp, const scalar_t* vp, View4 vkp,
                               View4 vvp, const scalar_t* out, const float* lse, const int64_t* start,
                               const int64_t* len, const std::vector<int64_t>& order,
                               const std::vector<int64_t>& group_begin, int64_t groups, int64_t heads, int64_t dim,
                               int64_t lp, int64_t max_len, double scale, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                               scalar_t* dkp, scalar_t* dvp) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, groups * heads, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> dqr(dim), gor(dim);
    std::vector<acc_t> dkp_acc(lp * dim), dvp_acc(lp * dim), dks(max_len * dim), dvs(max_len * dim);
    for (int64_t job = b; job < e; ++job) {
      const int64_t g = job / heads, h = job % heads;
      std::fill(dkp_acc.begin(), dkp_acc.end(), acc_t(0));
      std::fill(dvp_acc.begin(), dvp_acc.end(), acc_t(0));
      for (int64_t oi = group_begin[g]; oi < group_begin[g + 1]; ++oi) {
        const int64_t seq = order[oi];
        const int64_t r0 = start[seq], L = len[seq];
        std::fill(dks.begin(), dks.begin() + L * dim, acc_t(0));
        std::fill(dvs.begin(), dvs.begin() + L * dim, acc_t(0));
        for (int64_t t = 0; t < L; ++t) {
          const int64_t row = r0 + t;
          const scalar_t* qt = q + row * vq.s0 + h * vq.s1;
          const scalar_t* got = go + (row * heads + h) * dim;
          const scalar_t* ot = out + (row * heads + h) * dim;
          const acc_t m = static_cast<acc_t>(lse[row * heads + h]);
          acc_t delta = 0;
          for (int64_t c = 0; c < dim; ++c) {
            gor[c] = static_cast<acc_t>(got[c]);
            delta += gor[c] * static_cast<acc_t>(ot[c]);
          }
          std::fill(dqr.begin(), dqr.end(), acc_t(0));
          for (int64_t j = 0; j < lp + t + 1; ++j) {
            const bool pre = j < lp;
            const scalar_t* kj = pre ? kp + g * vkp.s0 + j * vkp.s1 + h * vkp.s2 : k + (r0 + j - lp) * vk.s0 + h * vk.s1;
            const scalar_t* vj = pre ? vp + g * vvp.s0 + j * vvp.s1 + h * vvp.s2 : v + (r0 + j - lp) * vv.s0 + h * vv.s1;
            acc_t s = 0, dp = 0;
            for (int64_t c = 0; c < dim; ++c) {
              s += static_cast<acc_t>(qt[c]) * static_cast<acc_t>(kj[c]);
              dp += gor[c] * static_cast<acc_t>(vj[c]);
            }
            const acc_t pj = std::exp(s * static_cast<acc_t>(scale) - m);
            const acc_t ds = pj * (dp - delta) * static_cast<acc_t>(scale);
            acc_t* dkj = pre ? dkp_acc.data() + j * dim : dks.data() + (j - lp) * dim;
            acc_t* dvj = pre ? dvp_acc.data() + j * dim : dvs.data() + (j - lp) * dim;
            for (int64_t c = 0; c < dim; ++c) {
              dqr[c] += ds * static_cast<acc_t>(kj[c]);
              dkj[c] += ds * static_cast<acc_t>(qt[c]);
              dvj[c] += pj * gor[c];
            }
          }
          scalar_t* dqt = dq + (row * heads + h) * dim;
          for (int64_t c = 0; c < dim; ++c) dqt[c] = static_cast<scalar_t>(dqr[c]);
        }
        for (int64_t t = 0; t < L; ++t) {
          scalar_t* dkt = dk + ((r0 + t) * heads + h) * dim;
          scalar_t* dvt = dv + ((r0 + t) * heads + h) * dim;
          for (int64_t c = 0; c < dim; ++c) {
            dkt[c] = static_cast<scalar_t>(dks[t * dim + c]);
            dvt[c] = static_cast<scalar_t>(dvs[t * dim + c]);
          }
        }
      }
      for (int64_t j = 0; j < lp; ++j) {
        scalar_t* a = dkp + ((g * lp + j) * heads + h) * dim;
        scalar_t* c2 = dvp + ((g * lp + j) * heads + h) * dim;
        for (int64_t c = 0; c < dim; ++c) {
          a[c] = static_cast<scalar_t>(dkp_acc[j * dim + c]);
          c2[c] = static_cast<scalar_t>(dvp_acc[j * dim + c]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kp_in, const at::Tensor& vp_in, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& seq_start, const at::Tensor& seq_len, const at::Tensor& seq_group, int64_t max_len,
    double scale) {
  check_attention_inputs(q_in, k_in, v_in, kp_in, vp_in, seq_start, seq_len, seq_group);
  auto q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in), kp = unit_last(kp_in), vp = unit_last(vp_in);
  auto go = grad_out.to(q.scalar_type()).contiguous();
  auto o = out.contiguous();
  auto ls = lse.to(at::kFloat).contiguous();
  auto st = seq_start.to(at::kLong).contiguous(), ln = seq_len.to(at::kLong).contiguous(),
       gr = seq_group.to(at::kLong).contiguous();
  const int64_t t = q.size(0), heads = q.size(1), dim = q.size(2), groups = kp.size(0), lp = kp.size(1),
                n = ln.numel();
  // Sequences of each group (counting sort: stable, so the summation order is fixed).
  const int64_t* gp = gr.data_ptr<int64_t>();
  std::vector<int64_t> group_begin(groups + 1, 0), order(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(gp[i] >= 0 && gp[i] < groups, "seq_group value ", gp[i], " outside [0, ", groups, ")");
    ++group_begin[gp[i] + 1];
  }
  for (int64_t g = 0; g < groups; ++g) group_begin[g + 1] += group_begin[g];
  {
    std::vector<int64_t> fill(group_begin.begin(), group_begin.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[gp[i]]++] = i;
  }
  auto dq = at::empty({t, heads, dim}, q.options());
  auto dk = at::empty({t, heads, dim}, q.options());
  auto dv = at::empty({t, heads, dim}, q.options());
  auto dkp = at::empty({groups, lp, heads, dim}, q.options());
  auto dvp = at::empty({groups, lp, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prompt_prefix_attention_backward", [&] {
    attention_backward_kernel<scalar_t>(
        go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        {q.stride(0), q.stride(1)}, {k.stride(0), k.stride(1)}, {v.stride(0), v.stride(1)}, kp.data_ptr<scalar_t>(),
        vp.data_ptr<scalar_t>(), {kp.stride(0), kp.stride(1), kp.stride(2)}, {vp.stride(0), vp.stride(1), vp.stride(2)},
        o.data_ptr<scalar_t>(), ls.data_ptr<float>(), st.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), order,
        group_begin, groups, heads, dim, lp, max_len, scale, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
        dv.data_ptr<scalar_t>(), dkp.data_ptr<scalar_t>(), dvp.data_ptr<scalar_t>());
  });
  return {dq, dk, dv, dkp, dvp};
}

// ------------------------------------------------------------------------------------------------
// EOT head: gather rows, LayerNorm (float32), projection, L2 normalise
// Returns (out [N, E] in x's dtype, y [N, W] f32 (LN output), z [N, E] f32 (pre-normalise),
//          mean [N] f32, rstd [N] f32).
// ------------------------------------------------------------------------------------------------
at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> eot_head_cpu(
    const at::Tensor& x, const at::Tensor& rows, const std::optional<at::Tensor>& ln_weight,
    const std::optional<at::Tensor>& ln_bias, double eps, const std::optional<at::Tensor>& proj,
    const std::optional<at::Tensor>& proj_bias, bool normalize) {
  DGK_CHECK_DIM(x, 2, "x");
  DGK_CHECK_FLOAT(x, "x");
  const auto acc = acc_type(x);
  auto xs = x.index_select(0, rows.to(at::kLong)).to(acc).contiguous();  // [N, W]
  const int64_t n = xs.size(0), w = xs.size(1);
  auto mean = at::empty({n}, x.options().dtype(acc));
  auto rstd = at::empty({n}, x.options().dtype(acc));
  auto y = at::empty({n, w}, x.options().dtype(acc));
  at::Tensor lw = ln_weight.has_value() ? ln_weight->to(acc).contiguous() : at::Tensor();
  at::Tensor lb = ln_bias.has_value() ? ln_bias->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "prompt_eot_head_ln", [&] {
    const scalar_t* xp = xs.data_ptr<scalar_t>();
    const scalar_t* wp = lw.defined() ? lw.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = lb.defined() ? lb.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xi = xp + i * w;
        scalar_t mu = 0, var = 0;
        for (int64_t c = 0; c < w; ++c) mu += xi[c];
        mu /= w;
        for (int64_t c = 0; c < w; ++c) var += (xi[c] - mu) * (xi[c] - mu);
        var /= w;
        const scalar_t r = scalar_t(1) / std::sqrt(var + static_cast<scalar_t>(eps));
        mp[i] = mu;
        rp[i] = r;
        for (int64_t c = 0; c < w; ++c) {
          scalar_t val = (xi[c] - mu) * r;
          if (wp) val *= wp[c];
          if (bp) val += bp[c];
          yp[i * w + c] = val;
        }
      }
    });
  });
  at::Tensor z = proj.has_value() ? at::mm(y, proj->to(acc)) : y.clone();
  if (proj_bias.has_value()) z.add_(proj_bias->to(acc));
  at::Tensor out = z;
  if (normalize) out = z / z.norm(2, {1}, true).clamp_min(kNormEps);
  return {out.to(x.scalar_type()), y, z, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> eot_head_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& rows, const std::optional<at::Tensor>& ln_weight,
    double eps, const std::optional<at::Tensor>& proj, const at::Tensor& y, const at::Tensor& z,
    const at::Tensor& mean, const at::Tensor& rstd, bool normalize) {
  const auto acc = acc_type(x);
  auto idx = rows.to(at::kLong);
  auto g = grad_out.to(acc);
  at::Tensor gz = g;
  if (normalize) {  // d/dz of z / max(|z|, eps)
    auto nrm = z.norm(2, {1}, true);
    auto den = nrm.clamp_min(kNormEps);
    auto o = z / den;
    auto radial = (o * g).sum(1, true);
    gz = at::where(nrm > kNormEps, (g - o * radial) / den, g / den);
  }
  at::Tensor dproj, dproj_b, gy;
  if (proj.has_value()) {
    auto p = proj->to(acc);
    dproj = at::mm(y.t(), gz);
    dproj_b = gz.sum(0);
    gy = at::mm(gz, p.t()).contiguous();
  } else {
    dproj = at::empty({0}, g.options());
    dproj_b = gz.sum(0);
    gy = gz.contiguous();
  }
  auto xs = x.index_select(0, idx).to(acc).contiguous();
  const int64_t n = xs.size(0), w = xs.size(1);
  at::Tensor lw = ln_weight.has_value() ? ln_weight->to(acc).contiguous() : at::Tensor();
  auto dxr = at::empty({n, w}, g.options());
  auto xhat = (xs - mean.unsqueeze(1)) * rstd.unsqueeze(1);
  auto dln_w = (gy * xhat).sum(0);
  auto dln_b = gy.sum(0);
  AT_DISPATCH_FLOATING_TYPES(acc, "prompt_eot_head_backward", [&] {
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* xh = xhat.data_ptr<scalar_t>();
    const scalar_t* wp = lw.defined() ? lw.data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = rstd.data_ptr<scalar_t>();
    scalar_t* dp = dxr.data_ptr<scalar_t>();
    at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t m1 = 0, m2 = 0;
        for (int64_t c = 0; c < w; ++c) {
          const scalar_t gh = gyp[i * w + c] * (wp ? wp[c] : scalar_t(1));
          m1 += gh;
          m2 += gh * xh[i * w + c];
        }
        m1 /= w;
        m2 /= w;
        for (int64_t c = 0; c < w; ++c) {
          const scalar_t gh = gyp[i * w + c] * (wp ? wp[c] : scalar_t(1));
          dp[i * w + c] = rp[i] * (gh - m1 - xh[i * w + c] * m2);
        }
      }
    });
  });
  auto dx = at::zeros({x.size(0), w}, x.options());
  dx.index_add_(0, idx, dxr.to(x.scalar_type()));
  return {dx, dln_w, dln_b, dproj, dproj_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(dgkernels, CPU, m) {
  m.impl("prompt_assemble", &assemble_cpu);
  m.impl("prompt_index_add_rows", &index_add_rows_cpu);
  m.impl("prompt_prefix_attention", &prefix_attention_cpu);
  m.impl("prompt_prefix_attention_backward", &prefix_attention_backward_cpu);
  m.impl("prompt_eot_head", &eot_head_cpu);
  m.impl("prompt_eot_head_backward", &eot_head_backward_cpu);
}

}  // namespace prompt
}  // namespace dgkernels
