// The broadening stage: closed-form pixel kernels (and their derivatives) in float64, the node blend, and the
// public fastspec::Broadening. See broadening.hpp for the method and training/fastspec_train/broadening.py
// for the same operator in torch.
#include "broadening.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace fastspec {
namespace detail {

namespace {
constexpr double kC = 299792.458;                       // km/s
const double kFwhmPerSigma = 2.0 * std::sqrt(2.0 * std::log(2.0));
constexpr double kTiny = 1e-30;                          // width 0 -> the identity kernel, no 0/0
constexpr int kBlock = 128;                              // correlate()'s output block

std::size_t round_up(std::size_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// A profile p(x) given by its antiderivatives C (CDF), D (first moment, D' = x p) and their derivatives by
// the width parameter, evaluated at integer offsets.
struct ProfileValues {
    std::vector<double> c, d, dc, dd;  // at m = -half-1 .. half+1
};

// K(m) = integral hat(x - m) p(x) dx for m = -half..half from C and D, renormalised to sum 1; dk the
// derivative of the normalised weights by the width (when the profile values carry dc, dd).
void hat_weights(const ProfileValues& v, int half, std::vector<double>& k, std::vector<double>* dk) {
    const int n = 2 * half + 1;
    k.assign(n, 0.0);
    std::vector<double> g(dk ? n : 0, 0.0);
    auto weight = [&](const std::vector<double>& c, const std::vector<double>& d, int i) {
        // i indexes m = i - half; the value arrays start at m = -half - 1.
        const double m = i - half;
        const double i0_lo = c[i + 1] - c[i], i1_lo = d[i + 1] - d[i];          // over [m-1, m]
        const double i0_hi = c[i + 2] - c[i + 1], i1_hi = d[i + 2] - d[i + 1];  // over [m, m+1]
        return (i1_lo - (m - 1) * i0_lo) + ((m + 1) * i0_hi - i1_hi);
    };
    double sum = 0, dsum = 0;
    for (int i = 0; i < n; ++i) {
        k[i] = weight(v.c, v.d, i);
        sum += k[i];
        if (dk) {
            g[i] = weight(v.dc, v.dd, i);
            dsum += g[i];
        }
    }
    // Renormalise: removes the (< 1e-8) Gaussian tail beyond `half`, so equivalent widths are conserved.
    for (int i = 0; i < n; ++i) k[i] /= sum;
    if (dk) {
        dk->resize(n);
        for (int i = 0; i < n; ++i) (*dk)[i] = g[i] / sum - k[i] * dsum / sum;
    }
}

// Gaussian of standard deviation s pixels: C = (1 + erf(x / (s sqrt 2))) / 2, D = -s^2 phi(x).
ProfileValues gaussian_values(double s, int half, bool derivatives) {
    s = std::max(s, kTiny);
    ProfileValues v;
    const double inv_sqrt_2pi = 1.0 / std::sqrt(2.0 * M_PI);
    for (int m = -half - 1; m <= half + 1; ++m) {
        const double x = m, u = x / s, e = std::exp(-0.5 * u * u);
        v.c.push_back(0.5 * (1.0 + std::erf(u / std::sqrt(2.0))));
        v.d.push_back(-s * inv_sqrt_2pi * e);
        if (derivatives) {
            v.dc.push_back(-u / s * inv_sqrt_2pi * e);          // dC/ds = -(x/s^2) phi_1(x/s)
            v.dd.push_back(-inv_sqrt_2pi * e * (1.0 + u * u));  // dD/ds
        }
    }
    return v;
}

// Gray's rotational profile of half-width w pixels, linear limb darkening eps: with t = x / w,
// G(t) = c1 sqrt(1 - t^2) + c2 (1 - t^2); C = 1/2 + c1/2 (t sqrt(1-t^2) + asin t) + c2 (t - t^3/3);
// D = w M(t), M = -c1 (1-t^2)^{3/2} / 3 + c2 (t^2/2 - t^4/4); dC/dw = -(t/w) G(t) inside |t| < 1, dD/dw = M - t^2 G.
ProfileValues rotation_values(double w, double eps, int half, bool derivatives) {
    w = std::max(w, kTiny);
    const double c1 = 2.0 * (1.0 - eps) / (M_PI * (1.0 - eps / 3.0)), c2 = eps / (2.0 * (1.0 - eps / 3.0));
    ProfileValues v;
    for (int m = -half - 1; m <= half + 1; ++m) {
        const double t = std::clamp(m / w, -1.0, 1.0), q = 1.0 - t * t, r = std::sqrt(q);
        const double M = -c1 * q * r / 3.0 + c2 * (t * t / 2.0 - t * t * t * t / 4.0);
        v.c.push_back(0.5 + c1 * 0.5 * (t * r + std::asin(t)) + c2 * (t - t * t * t / 3.0));
        v.d.push_back(w * M);
        if (derivatives) {
            const double G = c1 * r + c2 * q;
            v.dc.push_back(std::abs(t) < 1.0 ? -t / w * G : 0.0);
            v.dd.push_back(M - t * t * G);
        }
    }
    return v;
}

// Gray's rotational profile's Fourier transform at k = omega * w (unit area) and its first two derivatives by k:
// R(k) = A(k) + B(k), A = c1 pi J1(k)/k, B = 4 c2 (sin k - k cos k)/k^3; A' = -c1 pi J2/k, A'' = -c1 pi (J1/k - 3 J2/k^2);
// B' = 4 c2 [sin k/k^2 - 3 sc/k^4], B'' = 4 c2 [cos k/k^2 - 5 sin k/k^3 + 12 sc/k^5] (sc = sin k - k cos k).
// Below k = 0.1, where those cancel, the series R = 1 - a k^2 + b k^4 - c k^6.
void rotation_transform(double k, double c1, double c2, double& r, double& dr, double& ddr) {
    if (k < 0.1) {
        const double a = c1 * M_PI / 16.0 + 4.0 * c2 / 30.0, b = c1 * M_PI / 384.0 + 4.0 * c2 / 840.0,
                     c = c1 * M_PI / 18432.0 + 4.0 * c2 / 45360.0, k2 = k * k;
        r = 1.0 - k2 * (a - k2 * (b - c * k2));
        dr = -k * (2.0 * a - k2 * (4.0 * b - 6.0 * c * k2));
        ddr = -2.0 * a + k2 * (12.0 * b - 30.0 * c * k2);
        return;
    }
    const double sn = std::sin(k), cs = std::cos(k), sc = sn - k * cs, k2 = k * k;
    const double j1k = ::j1(k), j2k = 2.0 * j1k / k - ::j0(k);  // J2 by the recurrence
    r = c1 * M_PI * j1k / k + 4.0 * c2 * sc / (k2 * k);
    dr = -c1 * M_PI * j2k / k + 4.0 * c2 * (sn / k2 - 3.0 * sc / (k2 * k2));
    ddr = -c1 * M_PI * (j1k / k - 3.0 * j2k / k2) + 4.0 * c2 * (cs / k2 - 5.0 * sn / (k2 * k) + 12.0 * sc / (k2 * k2 * k));
}

}  // namespace

// M(a) = (1 - e^-a) / a = -expm1(-a) / a; dM/da = (e^-a (1 + a) - 1) / a^2. Below a = 1e-2 the series
// M = sum_k (-a)^k / (k+1)!, dM/da = sum_{k>=1} (-1)^k k a^(k-1) / (k+1)! to a^5 (next terms < 2e-16 there).
void macroturbulence_transform(double a, double& m, double& dm_da) {
    if (a < 1e-2) {
        m = 1.0 - a * (1.0 / 2 - a * (1.0 / 6 - a * (1.0 / 24 - a * (1.0 / 120 - a * (1.0 / 720 - a / 5040)))));
        dm_da = -1.0 / 2 + a * (2.0 / 6 - a * (3.0 / 24 - a * (4.0 / 120 - a * (5.0 / 720 - a * 6.0 / 5040))));
        return;
    }
    const double e = std::exp(-a);
    m = -std::expm1(-a) / a;
    dm_da = (e * (1.0 + a) - 1.0) / (a * a);
}

// Tables for band_limited_kernel, made once per stage: cos(omega_j) and 1/box(omega_j) on the finest frequency grid
// it uses (coarser grids take every stride-th entry), and R, R', R'' on a k grid of step 1/32, read by cubic Hermite
// interpolation (R from R and R', R' from R' and R''; error ~1e-8): Bessel functions cost 100 ns a call, and a
// kernel needs up to 500 frequencies at 9 nodes.
struct BroadeningStage::BandTables {
    int nmax = 0;
    std::vector<double> cos_om, inv_box;
    double hk = 1.0 / 32.0;
    std::vector<double> r, dr, ddr;
    double c1 = 0, c2 = 0;

    BandTables(int nmax_, double k_max, double eps) : nmax(nmax_) {
        c1 = 2.0 * (1.0 - eps) / (M_PI * (1.0 - eps / 3.0));
        c2 = eps / (2.0 * (1.0 - eps / 3.0));
        for (int j = 0; j <= nmax / 2; ++j) {
            const double om = 2.0 * M_PI * j / nmax;
            cos_om.push_back(std::cos(om));
            inv_box.push_back(j == 0 ? 1.0 : 0.5 * om / std::sin(0.5 * om));
        }
        const int nk = int(std::ceil(k_max / hk)) + 2;
        r.resize(nk), dr.resize(nk), ddr.resize(nk);
        for (int i = 0; i < nk; ++i) rotation_transform(i * hk, c1, c2, r[i], dr[i], ddr[i]);
    }

    void rotation(double k, double& rk, double& drk) const {
        const double x = k / hk;
        const int i = int(x);
        if (i + 1 >= int(r.size())) {  // beyond the table (not reached within the label ranges): exact
            double unused;
            rotation_transform(k, c1, c2, rk, drk, unused);
            return;
        }
        const double t = x - i, t2 = t * t, t3 = t2 * t;
        const double h00 = 2 * t3 - 3 * t2 + 1, h10 = t3 - 2 * t2 + t, h01 = -2 * t3 + 3 * t2, h11 = t3 - t2;
        rk = h00 * r[i] + h10 * hk * dr[i] + h01 * r[i + 1] + h11 * hk * dr[i + 1];
        drk = h00 * dr[i] + h10 * hk * ddr[i] + h01 * dr[i + 1] + h11 * hk * ddr[i + 1];
    }
};

namespace {

// The kernel for pixel-mean input: taps whose transform is H(omega) = R(omega w) exp(-sigma^2 omega^2 / 2) M(omega) /
// sinc(omega/2) on |omega| <= pi -- rotation, Gaussian and radial-tangential macroturbulence (M = (1 - e^-a) / a,
// a = (omega z / 2)^2, z = zeta in pixels; M = 1 at z = 0) with the input's one-pixel box divided out, for a spectrum read as
// band-limited (benchmarks/results/operator-floor-2026-12-03.md: its floor against SYNSPEC's fine mesh is 5.6e-6 for
// slow rotators at high R, against 1.5e-4 for hat weights on the same pixel means). H is sampled at
// omega_j = 2 pi j / nfft (the inverse real DFT, by direct cosine sums; nfft >= 1024 and >= 4 reach), the taps kept
// to |m| <= reach and divided by their sum; dk_dw, dk_dsigma and dk_dz (when asked for) are the derivatives of the
// normalised taps.
int band_limited_reach(double w, double sigma) { return int(std::ceil(w + 7.0 * sigma)) + 16; }
// What macroturbulence adds to the reach: 5 z (the profile is a mixture of Gaussians exp(-(v / zeta mu)^2) with
// zeta mu <= zeta: its mass beyond 5 zeta is below erfc(5) = 1.5e-12).
int vmac_reach(double z) { return z > 0 ? int(std::ceil(5.0 * z)) : 0; }

int band_limited_nfft(int reach) {
    // At least 1024 frequencies: the kernel of a sharp R rings as 1/m and a short transform wraps that ringing
    // back onto the taps (3e-5 at N = 128, 3e-7 at 1024); wide kernels need 4 reach.
    int nfft = 1024;
    while (nfft < 4 * reach) nfft *= 2;
    return nfft;
}

void band_limited_kernel(const BroadeningStage::BandTables& tab, double w, double sigma, double z, int reach,
                         std::vector<double>& k, std::vector<double>* dk_dw, std::vector<double>* dk_dsigma,
                         std::vector<double>* dk_dz) {
    const int nfft = band_limited_nfft(reach), stride = tab.nmax / nfft, n = 2 * reach + 1;
    std::vector<double> t(reach + 1, 0.0), tw(dk_dw ? reach + 1 : 0, 0.0), ts(dk_dsigma ? reach + 1 : 0, 0.0),
        tz(dk_dz ? reach + 1 : 0, 0.0);
    // exp(-a j^2), a = (sigma d_omega)^2 / 2, by its recurrence: g_{j+1} = g_j ratio_j, ratio_{j+1} = ratio_j q
    const double d_om = 2.0 * M_PI / nfft, a = 0.5 * sigma * sigma * d_om * d_om, q = std::exp(-2.0 * a);
    double g = 1.0, ratio = std::exp(-a);
    for (int j = 0; j <= nfft / 2; ++j, g *= ratio, ratio *= q) {
        if (g < 1e-17) break;  // the Gaussian only falls from here on: the rest is below double rounding
        const double om = j * d_om;
        double r = 1.0, dr = 0.0;
        if (w > 0) tab.rotation(om * w, r, dr);
        const double weight = (j == 0 || 2 * j == nfft) ? 1.0 : 2.0;  // the even, real spectrum's both halves
        double gb = weight * g * tab.inv_box[j * stride], hz = 0.0;
        if (z > 0) {  // macroturbulence: M(a), a = (om z / 2)^2; dH/dz = R gb dM/da * om^2 z / 2
            const double half_oz = 0.5 * om * z;
            double mt, dmt;
            macroturbulence_transform(half_oz * half_oz, mt, dmt);
            hz = r * gb * dmt * half_oz * om;
            gb *= mt;
        }
        const double h = r * gb, hw = om * dr * gb, hs = -sigma * om * om * h;
        // cos(m om) for m = 0..reach by the Chebyshev recurrence
        const double c = tab.cos_om[j * stride];
        double prev = c, cur = 1.0;  // cos(-om), cos(0)
        for (int m = 0; m <= reach; ++m) {
            t[m] += h * cur;
            if (dk_dw) tw[m] += hw * cur;
            if (dk_dsigma) ts[m] += hs * cur;
            if (dk_dz) tz[m] += hz * cur;
            const double next = 2.0 * c * cur - prev;
            prev = cur;
            cur = next;
        }
    }
    auto centred = [&](const std::vector<double>& half) {
        std::vector<double> full(n);
        for (int m = -reach; m <= reach; ++m) full[m + reach] = half[std::abs(m)];
        return full;
    };
    k = centred(t);
    double sum = 0;
    for (double x : k) sum += x;
    auto normalised_derivative = [&](const std::vector<double>& raw, std::vector<double>* out) {
        std::vector<double> d = centred(raw);
        double dsum = 0;
        for (double x : d) dsum += x;
        out->resize(n);
        for (int i = 0; i < n; ++i) (*out)[i] = d[i] / sum - k[i] * dsum / (sum * sum);
    };
    if (dk_dw) normalised_derivative(tw, dk_dw);
    if (dk_dsigma) normalised_derivative(ts, dk_dsigma);
    if (dk_dz) normalised_derivative(tz, dk_dz);
    for (double& x : k) x /= sum;
}

// Full linear convolution of two centred kernels (double), the result centred too.
std::vector<double> convolve(const std::vector<double>& a, const std::vector<double>& b) {
    std::vector<double> c(a.size() + b.size() - 1, 0.0);
    for (std::size_t i = 0; i < a.size(); ++i)
        for (std::size_t j = 0; j < b.size(); ++j) c[i + j] += a[i] * b[j];
    return c;
}

std::string num(double v) {
    std::ostringstream os;
    os.precision(10);
    os << v;
    return os.str();
}
}  // namespace

BroadeningStage::BroadeningStage(double wavelength_start, double wavelength_step, std::size_t n_pixels,
                                 double epsilon, int segments, double max_vsini, double min_resolution,
                                 Sampling sampling)
    : step_(wavelength_step), epsilon_(epsilon), max_vsini_(max_vsini), min_resolution_(min_resolution),
      sampling_(sampling), n_(n_pixels) {
    if (sampling != Sampling::point && sampling != Sampling::pixel_mean) throw Error("Broadening: unknown sampling");
    if (!(wavelength_start > 0) || !(wavelength_step > 0) || !std::isfinite(wavelength_start + wavelength_step) ||
        n_pixels < 2 || n_pixels > (1u << 24))
        throw Error("Broadening: need wavelength_start > 0, wavelength_step > 0 and 2 <= n_pixels <= 2^24");
    if (!(epsilon >= 0 && epsilon <= 1)) throw Error("Broadening: limb darkening epsilon = " + num(epsilon) + " is not in [0, 1]");
    if (segments < 1 || segments > 4096) throw Error("Broadening: segments = " + std::to_string(segments) + " is not in [1, 4096]");
    if (!(max_vsini >= 0 && max_vsini <= 3000)) throw Error("Broadening: max_vsini = " + num(max_vsini) + " km/s is not in [0, 3000]");
    if (!(min_resolution >= 10)) throw Error("Broadening: min_resolution = " + num(min_resolution) + " is below 10");
    const int S = std::min<int>(segments, int(n_pixels) - 1);
    const double lam_max = wavelength_start + wavelength_step * double(n_pixels - 1);
    rot_half_max_ = int(std::ceil(max_vsini / kC * lam_max / step_)) + 2;
    gauss_half_max_ = int(std::ceil(6.0 * lam_max / (kFwhmPerSigma * min_resolution * step_))) + 2;
    vmac_half_max_ = vmac_reach(kMaxVmac / kC * lam_max / step_);
    if (rot_half_max_ + gauss_half_max_ > int(n_pixels) * 4)
        throw Error("Broadening: kernels of " + std::to_string(rot_half_max_ + gauss_half_max_) +
                    " pixels are too wide for a grid of " + std::to_string(n_pixels));
    // Node pixels as numpy's round(linspace(0, n - 1, S + 1)) (round half to even, like nearbyint).
    std::vector<int> at(S + 1);
    const double spacing = double(n_pixels - 1) / S;
    for (int s = 0; s <= S; ++s) at[s] = int(std::nearbyint(s * spacing));
    for (int s = 0; s <= S; ++s) {
        Node node;
        const int c = at[s];
        node.lo = s > 0 ? at[s - 1] : c;
        node.hi = s < S ? at[s + 1] : c;
        node.wavelength = wavelength_start + wavelength_step * c;
        for (int i = node.lo; i <= node.hi; ++i) {
            double w = 1.0;
            if (i <= c && s > 0) w = double(i - node.lo) / std::max(c - node.lo, 1);
            if (i > c && s < S) w = double(node.hi - i) / std::max(node.hi - c, 1);
            node.hat.push_back(float(w));
        }
        nodes_.push_back(std::move(node));
    }
    if (sampling_ == Sampling::pixel_mean)  // w <= rot_half_max_ pixels at every node: k = omega w <= pi rot_half_max_
        bands_ = std::make_shared<const BandTables>(band_limited_nfft(max_half()), M_PI * rot_half_max_ + 1.0, epsilon_);
}

BroadeningStage::BroadeningStage(const Model& m)
    : BroadeningStage(m.wavelength_start(), m.wavelength_step(), m.n_pixels(), m.broadening().epsilon,
                      m.broadening().segments, m.labels()[m.broadening().vsini_label].max,
                      m.labels()[m.broadening().resolution_label].min, m.broadening().sampling) {
    max_resolution_ = m.labels()[m.broadening().resolution_label].max;
}

void BroadeningStage::check_resolution_factors(double resolution, const double* g) const {
    if (!g) return;
    if (!std::isfinite(resolution))
        throw InputError("resolution = " + num(resolution) + ": resolution factors scale a finite R");
    for (std::size_t s = 0; s < nodes_.size(); ++s) {
        const double r = resolution * g[s];
        const std::string where = " at node " + std::to_string(s) + " (" + num(nodes_[s].wavelength) + " Å)";
        if (!(g[s] > 0 && std::isfinite(g[s])))
            throw InputError("resolution factor " + num(g[s]) + where + " must be finite and > 0");
        if (!(r >= min_resolution_ * (1 - 1e-12)))
            throw InputError("R = " + num(resolution) + " x " + num(g[s]) + " = " + num(r) + where +
                             " is below the lowest R the stage takes, " + num(min_resolution_));
        if (!(r <= max_resolution_ * (1 + 1e-12)))
            throw InputError("R = " + num(resolution) + " x " + num(g[s]) + " = " + num(r) + where +
                             " is above the model's highest R, " + num(max_resolution_) +
                             ": an LSF narrower than the model represents");
    }
}

void BroadeningStage::check(double vsini, double resolution, double vmac, const double* resolution_factors) const {
    if (!(vsini >= 0 && vsini <= max_vsini_ * (1 + 1e-12)))
        throw InputError("vsini = " + num(vsini) + " km/s is outside [0, " + num(max_vsini_) + "]");
    if (!(resolution >= min_resolution_ * (1 - 1e-12)))  // also NaN; +inf is allowed
        throw InputError("resolution = " + num(resolution) + " is below " + num(min_resolution_) + " (inf allowed)");
    if (!(vmac >= 0 && vmac <= kMaxVmac))  // also NaN and inf
        throw InputError("vmac = " + num(vmac) + " km/s is outside [0, " + num(kMaxVmac) + "]");
    if (vmac > 0 && sampling_ != Sampling::pixel_mean)
        throw InputError("vmac = " + num(vmac) + " km/s: macroturbulence needs a pixel-mean broadening stage (model "
                         "format 3); this stage takes point samples (format 2), which has none");
    check_resolution_factors(resolution, resolution_factors);
}

void BroadeningStage::make_kernels(double vsini, double resolution, double vmac, bool derivatives, Kernels& k,
                                   const double* resolution_factors) const {
    check(vsini, resolution, vmac, resolution_factors);
    struct Parts {
        std::vector<double> flux, dv, dr, dz;
    };
    std::vector<Parts> parts(nodes_.size());
    k.node_half.assign(nodes_.size(), 0);
    int half = 0;
    for (std::size_t s = 0; s < nodes_.size(); ++s) {
        const double lam = nodes_[s].wavelength;
        const double dw_dv = lam / kC / step_, w = vsini * dw_dv;
        // The node's own R: the label times its resolution factor (x * 1 == x: no factors, the same bits).
        const double node_resolution = resolution_factors ? resolution * resolution_factors[s] : resolution;
        const double sigma = std::isinf(resolution) ? 0.0 : lam / (kFwhmPerSigma * node_resolution * step_);
        // Only the taps that can be non-zero: the rotation kernel vanishes beyond w + 1 pixels; the Gaussian is
        // cut at 6 sigma + 2 pixels like training's (its tail there is < 1e-8 and renormalised away).
        // sigma = lam / (f R g_s step): dsigma/dR = -sigma / R, the derivative by the label with the shape g held.
        const double ds_dr = std::isinf(resolution) ? 0.0 : -sigma / resolution;
        if (sampling_ == Sampling::pixel_mean) {
            // One composite kernel: rotation, Gaussian, macroturbulence and the input's box together
            // (band_limited_kernel). zeta is in km/s like v sin i: z = vmac * dw_dv pixels.
            const double z = vmac * dw_dv;
            int reach = 0;
            if (w > 0 || sigma > 0 || z > 0) reach = std::min(base_half_max(), band_limited_reach(w, sigma)) + vmac_reach(z);
            if (reach == 0) {
                parts[s].flux = {1.0};  // v sin i = 0, R = inf and no macroturbulence: the identity
                if (derivatives) parts[s].dv = parts[s].dr = parts[s].dz = {0.0};
            } else {
                band_limited_kernel(*bands_, w, sigma, z, reach, parts[s].flux, derivatives ? &parts[s].dv : nullptr,
                                    derivatives ? &parts[s].dr : nullptr, derivatives ? &parts[s].dz : nullptr);
                if (derivatives) {
                    for (double& x : parts[s].dv) x *= dw_dv;
                    for (double& x : parts[s].dr) x *= ds_dr;
                    for (double& x : parts[s].dz) x *= dw_dv;  // d/dvmac = d/dz * dz/dvmac
                }
            }
            k.node_half[s] = reach;
            half = std::max(half, reach);
            continue;
        }
        const int hr = std::min(rot_half_max_, int(std::ceil(w)) + 1);
        const int hg = std::min(gauss_half_max_, int(std::ceil(6.0 * sigma)) + 2);
        std::vector<double> kr, kg, dkr, dkg;
        hat_weights(rotation_values(w, epsilon_, hr, derivatives), hr, kr, derivatives ? &dkr : nullptr);
        hat_weights(gaussian_values(sigma, hg, derivatives), hg, kg, derivatives ? &dkg : nullptr);
        parts[s].flux = convolve(kr, kg);
        if (derivatives) {
            parts[s].dv = convolve(dkr, kg);
            for (double& x : parts[s].dv) x *= dw_dv;                     // d/dvsini = d/dw * dw/dvsini
            parts[s].dr = convolve(kr, dkg);
            for (double& x : parts[s].dr) x *= ds_dr;
            parts[s].dz.assign(parts[s].flux.size(), 0.0);  // no macroturbulence on point samples (check())
        }
        k.node_half[s] = hr + hg;
        half = std::max(half, hr + hg);
    }
    k.half = half;
    const std::size_t taps = 2 * std::size_t(half) + 1;
    auto lay_out = [&](std::vector<float>& dst, std::vector<double> Parts::*which) {
        dst.assign(nodes_.size() * taps, 0.0f);
        for (std::size_t s = 0; s < nodes_.size(); ++s) {
            const std::vector<double>& src = parts[s].*which;
            const std::size_t pad = (taps - src.size()) / 2;
            for (std::size_t i = 0; i < src.size(); ++i) dst[s * taps + pad + i] = float(src[i]);
        }
    };
    lay_out(k.flux, &Parts::flux);
    if (derivatives) {
        lay_out(k.d_vsini, &Parts::dv);
        lay_out(k.d_resolution, &Parts::dr);
        lay_out(k.d_vmac, &Parts::dz);
    } else {
        k.d_vsini.clear();
        k.d_resolution.clear();
        k.d_vmac.clear();
    }
}

void BroadeningStage::apply(const Kernels& k, Which which, const float* x, float* y, std::vector<float>& scratch) const {
    const std::vector<float>& taps = which == Which::flux      ? k.flux
                                     : which == Which::d_vsini ? k.d_vsini
                                     : which == Which::d_vmac  ? k.d_vmac
                                                               : k.d_resolution;
    if (taps.empty()) throw Error("BroadeningStage::apply: kernels made without derivatives");
    const int h = k.half, n = int(n_);
    const std::size_t ntaps = 2 * std::size_t(h) + 1;
    // Scratch: [edge-extended x: n + 2h + kBlock | one node's output: round_up(widest hat) | the blend: n].
    std::size_t widest = 0;
    for (const Node& nd : nodes_) widest = std::max<std::size_t>(widest, nd.hi - nd.lo + 1);
    const std::size_t ext = n_ + 2 * std::size_t(h) + kBlock, need = ext + round_up(widest) + n_;
    if (scratch.size() < need) scratch.resize(need);
    float* xe = scratch.data();
    float* yn = xe + ext;
    float* acc = yn + round_up(widest);
    std::fill(xe, xe + h, x[0]);
    std::copy(x, x + n, xe + h);
    std::fill(xe + h + n, xe + ext, x[n - 1]);
    std::fill(acc, acc + n, 0.0f);
    for (std::size_t s = 0; s < nodes_.size(); ++s) {
        const Node& nd = nodes_[s];
        const int len = nd.hi - nd.lo + 1;
        // Output pixel i needs x[i - m], m in [-hs, hs]: x[i] sits at xe[i + h]. Only the node's own taps.
        const int hs = k.node_half[s];
        cpu::correlate(xe + h + nd.lo, len, taps.data() + s * ntaps + (h - hs), hs, yn);
        for (int i = 0; i < len; ++i) acc[nd.lo + i] += nd.hat[i] * yn[i];
    }
    std::copy(acc, acc + n, y);
}

}  // namespace detail

// --- the public class ------------------------------------------------------------------------------------------

struct Broadening::Impl {
    explicit Impl(detail::BroadeningStage s) : stage(std::move(s)) {}
    detail::BroadeningStage stage;
};

Broadening::Broadening(double wavelength_start, double wavelength_step, std::size_t n_pixels, double epsilon,
                       int segments, double max_vsini, double min_resolution, Sampling sampling)
    : impl_(std::make_unique<Impl>(detail::BroadeningStage(wavelength_start, wavelength_step, n_pixels, epsilon,
                                                           segments, max_vsini, min_resolution, sampling))) {}

Broadening::Broadening(const Model& model) {
    if (!model.broadening().enabled)
        throw Error(model.path() + ": this model has no broadening stage (format version " +
                    std::to_string(model.format_version()) + ")");
    impl_ = std::make_unique<Impl>(detail::BroadeningStage(model));
}

Broadening::~Broadening() = default;
Broadening::Broadening(Broadening&&) noexcept = default;
Broadening& Broadening::operator=(Broadening&&) noexcept = default;

std::size_t Broadening::n_pixels() const { return impl_->stage.n_pixels(); }

std::vector<double> Broadening::node_wavelengths() const {
    std::vector<double> w(impl_->stage.node_count());
    for (std::size_t s = 0; s < w.size(); ++s) w[s] = impl_->stage.node_wavelength(s);
    return w;
}

void Broadening::apply(const float* in, double vsini, double resolution, float* out, float* d_vsini,
                       float* d_resolution) const {
    apply(in, vsini, resolution, 0.0, out, d_vsini, d_resolution, nullptr);
}

void Broadening::apply(const float* in, double vsini, double resolution, double vmac, float* out, float* d_vsini,
                       float* d_resolution, float* d_vmac, const double* resolution_factors) const {
    if (!in || !out) throw InputError("Broadening::apply: in and out must not be null");
    using W = detail::BroadeningStage::Which;
    detail::BroadeningStage::Kernels k;
    impl_->stage.make_kernels(vsini, resolution, vmac, d_vsini || d_resolution || d_vmac, k, resolution_factors);
    std::vector<float> scratch;
    // The flux last: `out` may be `in` (the stage reads its input in full before it writes).
    if (d_vsini) impl_->stage.apply(k, W::d_vsini, in, d_vsini, scratch);
    if (d_resolution) impl_->stage.apply(k, W::d_resolution, in, d_resolution, scratch);
    if (d_vmac) impl_->stage.apply(k, W::d_vmac, in, d_vmac, scratch);
    impl_->stage.apply(k, W::flux, in, out, scratch);
}

double Broadening::max_vmac() { return detail::kMaxVmac; }

}  // namespace fastspec
