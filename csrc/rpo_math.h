// The arithmetic of the pair stage that the CPU and the CUDA kernels share.
//
// docs/loss.md and rpo_fast/reference.py::pair_loss are the definition; this header
// is that definition per element, so that both backends compute the same numbers and the
// CPU tests exercise the code the GPU runs. Everything here is a pure function of its
// arguments: no allocation, no loops over memory that a backend would parallelize
// differently. The pair stage works in double: it is O(M^2) on M (tiny), and beta (~2500)
// multiplies differences of per-sample errors that agree to a few digits.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define RPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RPO_HOST_DEVICE inline
#endif

namespace rpo_fast {
namespace math {

// Codes of rpo_fast/_types.py (the ints the ops take).
enum Method : int64_t { kSft = 0, kDpo = 1, kRpo = 2 };
enum LossType : int64_t { kSigmoid = 0, kHinge = 1, kIpo = 2 };

// Order of the metrics vector (_types.METRIC_NAMES).
enum Metric : int { kImplicitAcc = 0, kRewardMargin = 1, kModelMse = 2, kRefMse = 3, kWeightDiag = 4 };
constexpr int kNumMetrics = 5;

RPO_HOST_DEVICE double quiet_nan() { return std::numeric_limits<double>::quiet_NaN(); }

// f(x) of docs/loss.md. NaN in gives NaN out for every type (like torch).
RPO_HOST_DEVICE double loss_element(double x, int64_t loss_type, double beta) {
  if (loss_type == kSigmoid) {
    // -log(sigmoid(x)) = softplus(-x) = max(-x, 0) + log1p(exp(-|x|)): no overflow for any x.
    const double y = -x;
    return (y > 0.0 ? y : 0.0) + log1p(exp(-fabs(y)));
  }
  if (loss_type == kHinge) {
    const double y = 1.0 - x;
    return y < 0.0 ? 0.0 : y;  // relu; keeps NaN
  }
  const double y = x / beta - 0.5 / beta;  // ipo
  return y * y;
}

// df/dx. At hinge's kink (x == 1) the derivative is 0, as torch.relu's backward gives.
RPO_HOST_DEVICE double loss_element_grad(double x, int64_t loss_type, double beta) {
  if (loss_type == kSigmoid) {
    // d/dx softplus(-x) = -sigmoid(-x), written so that exp never overflows.
    if (x >= 0.0) {
      const double e = exp(-x);
      return -e / (1.0 + e);
    }
    if (x < 0.0) return -1.0 / (1.0 + exp(x));
    return x;  // NaN
  }
  if (loss_type == kHinge) {
    if (x != x) return x;
    return 1.0 - x > 0.0 ? -1.0 : 0.0;
  }
  return 2.0 * (x / beta - 0.5 / beta) / beta;  // ipo
}

RPO_HOST_DEVICE bool is_finite(double v) { return v - v == 0.0; }  // false for NaN and +-inf

// The inputs of the pair stage: per-sample errors of the 2M samples (winners [0, M),
// losers [M, 2M)), optional (M, M) row-major weights (null: uniform 1/M), and the settings.
// weight_scale multiplies every weight: M puts row-normalized weights on DPO's scale
// (mean 1, so that a pair's own logit has DPO's strength at the same beta), 1 leaves them.
struct PairProblem {
  const float* model_err;  // (2M,)
  const float* ref_err;    // (2M,); null for sft
  const float* weights;    // (M, M) or null
  int64_t m;
  int64_t method;
  int64_t loss_type;
  double beta;
  double weight_scale;

  RPO_HOST_DEVICE double delta(int64_t k) const { return double(model_err[k]) - double(ref_err[k]); }
  RPO_HOST_DEVICE double weight(int64_t i, int64_t j) const {
    return weight_scale * (weights != nullptr ? double(weights[i * m + j]) : 1.0 / double(m));
  }
  // z_ij = beta * (delta_l_j - delta_w_i): winner i against loser j.
  RPO_HOST_DEVICE double logit(int64_t i, int64_t j) const { return beta * (delta(m + j) - delta(i)); }
  // How many terms the loss averages: M^2 for rpo, M for dpo and sft.
  RPO_HOST_DEVICE double loss_count() const { return method == kRpo ? double(m) * double(m) : double(m); }
};

// Whether the inputs that the loss reads at index k are finite: sample errors k (any k in
// [0, 2M)) and, for rpo, weight row k (k < M). A backend ANDs this over k; any false makes
// the loss and every coefficient NaN (a contract: never a silently finite loss).
RPO_HOST_DEVICE bool inputs_finite_at(const PairProblem& p, int64_t k) {
  if (p.method == kSft) return true;  // sft has no finiteness rule: NaN flows through the mean
  bool ok = is_finite(p.model_err[k]) && is_finite(p.ref_err[k]);
  if (p.method == kRpo && p.weights != nullptr && k < p.m) {
    for (int64_t j = 0; j < p.m; ++j) ok = ok && is_finite(p.weights[k * p.m + j]);
  }
  return ok;
}

// Row i of the loss matrix (winner i): sum_j f(x_ij) and d/d delta_w_i of sum_j f(x_ij),
// with x_ij = w_ij z_ij (rpo) or the diagonal only (dpo). sft: the winner's error.
struct RowTerms {
  double loss_sum;
  double grad_winner;
};

RPO_HOST_DEVICE RowTerms row_terms(const PairProblem& p, int64_t i) {
  RowTerms out{0.0, 0.0};
  if (p.method == kSft) {
    out.loss_sum = double(p.model_err[i]);
    out.grad_winner = 1.0;
    return out;
  }
  if (p.method == kDpo) {
    const double z = p.logit(i, i);
    out.loss_sum = loss_element(z, p.loss_type, p.beta);
    out.grad_winner = -p.beta * loss_element_grad(z, p.loss_type, p.beta);
    return out;
  }
  for (int64_t j = 0; j < p.m; ++j) {
    const double w = p.weight(i, j);
    const double x = w * p.logit(i, j);
    out.loss_sum += loss_element(x, p.loss_type, p.beta);
    out.grad_winner -= p.beta * w * loss_element_grad(x, p.loss_type, p.beta);
  }
  return out;
}

// Column j of the loss matrix (loser j): d/d delta_l_j of sum_i f(x_ij).
RPO_HOST_DEVICE double column_grad(const PairProblem& p, int64_t j) {
  if (p.method == kSft) return 0.0;  // losers do not enter the sft loss
  if (p.method == kDpo) return p.beta * loss_element_grad(p.logit(j, j), p.loss_type, p.beta);
  double g = 0.0;
  for (int64_t i = 0; i < p.m; ++i) {
    const double w = p.weight(i, j);
    g += p.beta * w * loss_element_grad(w * p.logit(i, j), p.loss_type, p.beta);
  }
  return g;
}

// coef_k = dL/d model_err_k from a row or column gradient sum (dL/d delta = dL/d model_err).
RPO_HOST_DEVICE float coefficient(const PairProblem& p, double grad_sum, bool finite) {
  return finite ? float(grad_sum / p.loss_count()) : float(quiet_nan());
}

// Pair i's contributions to the metric sums (index order of Metric). The sums over i in
// [0, M) go through finish_metrics.
RPO_HOST_DEVICE void metric_terms(const PairProblem& p, int64_t i, double* sums) {
  sums[kModelMse] += double(p.model_err[i]) + double(p.model_err[p.m + i]);
  if (p.method == kSft) return;
  const double z = p.logit(i, i);
  sums[kImplicitAcc] += (z > 0.0 ? 1.0 : 0.0) + (z == 0.0 ? 0.5 : 0.0);
  sums[kRewardMargin] += z / p.beta;
  sums[kRefMse] += double(p.ref_err[i]) + double(p.ref_err[p.m + i]);
  if (p.method == kRpo) sums[kWeightDiag] += p.weight(i, i);
}

RPO_HOST_DEVICE void finish_metrics(const PairProblem& p, const double* sums, float* metrics) {
  const double m = double(p.m);
  metrics[kModelMse] = float(sums[kModelMse] / (2.0 * m));
  if (p.method == kSft) {
    metrics[kImplicitAcc] = metrics[kRewardMargin] = metrics[kRefMse] = metrics[kWeightDiag] = float(quiet_nan());
    return;
  }
  metrics[kImplicitAcc] = float(sums[kImplicitAcc] / m);
  metrics[kRewardMargin] = float(sums[kRewardMargin] / m);
  metrics[kRefMse] = float(sums[kRefMse] / (2.0 * m));
  metrics[kWeightDiag] = p.method == kRpo ? float(sums[kWeightDiag] / m) : float(quiet_nan());
}

RPO_HOST_DEVICE float finish_loss(const PairProblem& p, double loss_sum, bool finite) {
  return finite ? float(loss_sum / p.loss_count()) : float(quiet_nan());
}

// The pair stage in tiles, the same on every backend: the 2M indices k (winner rows k < M,
// loser columns k >= M) cut into tiles of kPairTile; each index writes its coefficient as if
// the inputs were finite and adds its loss and metric terms to its tile's partial; the
// partials are combined in tile order (finish_tiles), and when any input was not finite every
// coefficient is then overwritten with NaN. CPU: tiles over threads, indices in order within
// a tile. CUDA: one block a tile, one thread an index, block sums in a fixed tree order; a
// second one-block kernel finishes. So a global batch of M = 1024 spreads over 16 blocks
// instead of looping in one, and the CPU tests run the decomposition the GPU runs.
constexpr int64_t kPairTile = 128;

struct TilePartial {
  double loss;
  double metrics[kNumMetrics];
  bool finite;
};

RPO_HOST_DEVICE int64_t pair_tiles(int64_t m) { return (2 * m + kPairTile - 1) / kPairTile; }

// Index k's share: coef[k] (finite assumed) and its terms added to loss and sums; returns
// whether the inputs it reads are finite.
RPO_HOST_DEVICE bool index_terms(const PairProblem& p, int64_t k, float* coef, double& loss, double* sums) {
  if (k < p.m) {
    const RowTerms r = row_terms(p, k);
    loss += r.loss_sum;
    coef[k] = coefficient(p, r.grad_winner, true);
    metric_terms(p, k, sums);
  } else {
    coef[k] = coefficient(p, column_grad(p, k - p.m), true);
  }
  return inputs_finite_at(p, k);
}

// The loss and metrics from the tiles' partials, combined in tile order; returns whether
// every input was finite (if not, the caller sets every coefficient to NaN).
RPO_HOST_DEVICE bool finish_tiles(const PairProblem& p, const TilePartial* tiles, int64_t count, float* loss,
                                  float* metrics) {
  double loss_sum = 0.0;
  double sums[kNumMetrics] = {0.0, 0.0, 0.0, 0.0, 0.0};
  bool finite = true;
  for (int64_t t = 0; t < count; ++t) {
    loss_sum += tiles[t].loss;
    for (int i = 0; i < kNumMetrics; ++i) sums[i] += tiles[t].metrics[i];
    finite = finite && tiles[t].finite;
  }
  *loss = finish_loss(p, loss_sum, finite);
  finish_metrics(p, sums, metrics);
  return finite;
}

}  // namespace math
}  // namespace rpo_fast
