// The broadening stage (rotation, then the instrumental Gaussian) shared by every backend: the kernels are
// built here, on the host, in float64; a backend only runs the blended convolution (cpu/convolve.cpp).
//
// The method is training's (training/fastspec_train/broadening.py), so a model sees at inference exactly
// the operator it was validated with:
//   * the grid is cut into `segments` pieces; at each of the segments + 1 nodes the kernels are built for the
//     widths at that node's wavelength, and between two nodes the two results are blended linearly (hat
//     weights, a partition of unity), so the kernel width follows lambda smoothly;
//   * point samples (Sampling::point): the pixel weights K(m) = integral of hat(x - m) p(x) dx read the spectrum
//     as its piecewise-linear interpolant; they come in closed form from the profile's CDF and first moment, sum
//     to 1, and tend to the identity as the width goes to 0 (vsini = 0, R = infinity);
//   * pixel means (Sampling::pixel_mean, format version 3): the input is the flux integrated over each pixel (the
//     spectrum convolved with a one-pixel box), so one composite kernel per node has the transform
//     rotation * Gaussian / box on |omega| <= pi, the spectrum read as band-limited (band_limited_kernel);
//   * rotation and Gaussian are combined into one kernel per node, applied to the spectrum extended by its
//     edge values (training's FFT applies both to the same edge-extended window: the same operator);
//   * macroturbulence (pixel means only): Gray's radial-tangential profile (equal radial and tangential areas, no
//     limb darkening) of zeta = vmac km/s is one more factor of the composite kernel's transform,
//     M(omega) = (1 - exp(-a)) / a with a = (omega z / 2)^2, z = zeta in pixels at the node (macroturbulence_transform);
//     a point-sample stage refuses vmac > 0 (InputError naming the sampling and the model format);
//   * a line-spread function that varies along the range (optional, per call): resolution factors g_s, one per
//     node, make node s's Gaussian that of R_s = R * g_s (R the label: the LSF's scale, g its shape). Then
//     dsigma_s/dR = -sigma_s / R, so the d_resolution taps are the derivative by R with the shape held.
#pragma once

#include <cstddef>
#include <limits>
#include <memory>
#include <vector>

#include "fastspec/fastspec.hpp"

namespace fastspec::detail {

// The largest radial-tangential macroturbulence zeta the stage takes (km/s); it sizes the kernels (max_half).
constexpr double kMaxVmac = 50.0;

// Gray's radial-tangential macroturbulence profile's Fourier transform, M = (1 - e^-a) / a, and dM/da, at
// a = (pi zeta s)^2 (s the frequency in cycles per unit of zeta; a >= 0). Series below a = 1e-2, where the closed
// form cancels. Exposed for the tests (fastspec._core._macroturbulence_transform).
void macroturbulence_transform(double a, double& m, double& dm_da);

class BroadeningStage {
public:
    BroadeningStage(double wavelength_start, double wavelength_step, std::size_t n_pixels, double epsilon,
                    int segments, double max_vsini, double min_resolution, Sampling sampling = Sampling::point);
    // The stage a version-2 model describes: its grid, epsilon, segments and the ranges of its v sin i and R
    // labels (model.broadening().enabled must be true).
    explicit BroadeningStage(const Model& model);

    // The kernels of one (vsini, R, vmac): for every node, 2 * half + 1 float taps (nodes with narrower kernels are
    // zero-padded to the widest), and with `derivatives` their derivatives by vsini, by R and by vmac.
    struct Kernels {
        int half = 0;
        std::vector<int> node_half;  // each node's own half-width (<= half): the taps beyond it are zero
        std::vector<float> flux, d_vsini, d_resolution, d_vmac;  // (nodes, 2 * half + 1) each
    };
    enum class Which { flux, d_vsini, d_resolution, d_vmac };

    // Throws InputError for vsini outside [0, max_vsini], resolution below min_resolution (inf is allowed), or vmac
    // outside [0, kMaxVmac] (NaN included) or > 0 on a point-sample stage; and check_resolution_factors' errors.
    void check(double vsini, double resolution, double vmac = 0.0, const double* resolution_factors = nullptr) const;
    // resolution_factors: nullptr, or node_count() values g_s. Throws InputError unless every g_s is finite and > 0,
    // resolution is finite, and every R_s = resolution * g_s lies in [min_resolution, max_resolution] (the message
    // names the node, its wavelength and the values).
    void check_resolution_factors(double resolution, const double* resolution_factors) const;
    // vmac: radial-tangential macroturbulence zeta, km/s (0: none; then the kernels are the ones without it, bit for
    // bit). d_vmac is 0 at vmac = 0 (the transform is even in zeta). resolution_factors: as check_resolution_factors
    // (nullptr: all ones, the same kernels bit for bit).
    void make_kernels(double vsini, double resolution, double vmac, bool derivatives, Kernels& k,
                      const double* resolution_factors = nullptr) const;
    // y = sum over nodes of hat_s * (K_s applied to x), x extended by its edge values; x and y may alias.
    // scratch is grown as needed (one per thread).
    void apply(const Kernels& k, Which which, const float* x, float* y, std::vector<float>& scratch) const;

    std::size_t n_pixels() const { return n_; }
    Sampling sampling() const { return sampling_; }
    // The node layout, for device backends that run the blend themselves (cuda/): node s covers pixels
    // [node_lo(s), node_hi(s)] with weights node_hat(s); make_kernels never returns a half above max_half().
    std::size_t node_count() const { return nodes_.size(); }
    int node_lo(std::size_t s) const { return nodes_[s].lo; }
    int node_hi(std::size_t s) const { return nodes_[s].hi; }
    const std::vector<float>& node_hat(std::size_t s) const { return nodes_[s].hat; }
    // where node s's kernel widths are taken (Å, the grid's medium)
    double node_wavelength(std::size_t s) const { return nodes_[s].wavelength; }
    // the widest kernel make_kernels returns (pixel means: the band-limited kernel's reach, w + 7 sigma + 16, plus
    // 5 zeta for macroturbulence up to kMaxVmac)
    int max_half() const { return base_half_max() + (sampling_ == Sampling::pixel_mean ? vmac_half_max_ : 0); }

private:
    // the widest kernel without macroturbulence (what the rotation and Gaussian reach is capped at)
    int base_half_max() const { return rot_half_max_ + gauss_half_max_ + (sampling_ == Sampling::pixel_mean ? gauss_half_max_ / 6 + 16 : 0); }
    struct Node {
        int lo, hi;               // the pixels this node's hat covers
        double wavelength;        // where its kernel widths are taken
        std::vector<float> hat;   // hi - lo + 1 weights
    };
    double step_, epsilon_, max_vsini_, min_resolution_;
    // the largest R_s resolution factors may give: a model's R label max (an LSF narrower than the network was
    // trained with), +inf for a stage made from a grid alone
    double max_resolution_ = std::numeric_limits<double>::infinity();
    Sampling sampling_;

public:
    struct BandTables;  // pixel means: frequency and rotation-transform tables (broadening.cpp)

private:
    std::shared_ptr<const BandTables> bands_;
    std::size_t n_;
    int rot_half_max_, gauss_half_max_, vmac_half_max_;
    std::vector<Node> nodes_;
};

namespace cpu {
// y[i] = sum_{m=-half}^{half} k[half + m] * x[i - m] for i in [0, n): x is read at [-half, round_up(n, 64) + half)
// and y written at [0, round_up(n, 64)) (callers pad both). AVX-512 / AVX2 / baseline picked at load time.
void correlate(const float* x, int n, const float* k, int half, float* y);
}  // namespace cpu

}  // namespace fastspec::detail
