// fastspec::Broadening against an independent float64 reference: the pixel kernels here come from numerical
// quadrature of hat(x - m) * profile(x) (not from the closed forms the library uses), the node blend and the
// edge extension follow docs/model-format.md. Fresh random spectra every run, outputs poisoned with NaN first;
// the derivatives are checked against central differences of the reference. Runs under ASan/UBSan in CI.
#include <algorithm>
#include <array>
#include <limits>

#include "test_util.hpp"

namespace {

constexpr double kC = 299792.458, kStart = 4450.0, kStep = 0.05, kEps = 0.6;
constexpr int kN = 700, kSegments = 3;
const double kFwhmPerSigma = 2.0 * std::sqrt(2.0 * std::log(2.0));

// integral of f over [a, b] by composite Simpson with n (even) intervals.
template <class F>
double simpson(F f, double a, double b, int n = 400) {
    const double h = (b - a) / n;
    double s = f(a) + f(b);
    for (int i = 1; i < n; ++i) s += f(a + i * h) * (i % 2 ? 4 : 2);
    return s * h / 3;
}

double hat(double x) { return std::max(0.0, 1.0 - std::abs(x)); }

// Hat weights of Gray's rotational profile of half-width w pixels (x = w sin(theta) removes the square-root
// edges), normalised to sum 1; w = 0 is the identity.
std::vector<double> rotation_kernel(double w, int half) {
    std::vector<double> k(2 * half + 1, 0.0);
    if (w == 0) {
        k[half] = 1;
        return k;
    }
    const double c1 = 2 * (1 - kEps) / (M_PI * (1 - kEps / 3)), c2 = kEps / (2 * (1 - kEps / 3));
    double sum = 0;
    for (int m = -half; m <= half; ++m) {
        auto f = [&](double th) {
            const double t = std::sin(th), G = c1 * std::cos(th) + c2 * std::cos(th) * std::cos(th);
            return hat(w * t - m) * G * std::cos(th);  // p(x) dx = G(t) dt, dt = cos(theta) dtheta
        };
        // Split at the hat's kinks so Simpson integrates smooth pieces.
        std::vector<double> cuts = {-M_PI / 2, M_PI / 2};
        for (double x : {m - 1.0, double(m), m + 1.0})
            if (std::abs(x) < w) cuts.push_back(std::asin(x / w));
        std::sort(cuts.begin(), cuts.end());
        double v = 0;
        for (std::size_t i = 0; i + 1 < cuts.size(); ++i) v += simpson(f, cuts[i], cuts[i + 1]);
        k[m + half] = v;
        sum += v;
    }
    for (double& v : k) v /= sum;
    return k;
}

std::vector<double> gaussian_kernel(double sigma, int half) {
    std::vector<double> k(2 * half + 1, 0.0);
    if (sigma == 0) {
        k[half] = 1;
        return k;
    }
    double sum = 0;
    for (int m = -half; m <= half; ++m) {
        auto f = [&](double x) { return hat(x - m) * std::exp(-0.5 * x * x / (sigma * sigma)); };
        k[m + half] = simpson(f, m - 1.0, double(m)) + simpson(f, double(m), m + 1.0);
        sum += k[m + half];
    }
    for (double& v : k) v /= sum;
    return k;
}

// The broadened spectrum in double precision, from the format's description: each node's kernel (kernel_at(w, sigma,
// half) returns 2 half + 1 taps for the widths in pixels at the node), applied to the edge-extended spectrum, blended.
// factors: nullptr, or a resolution factor per node (node s takes R * factors[s]).
template <class KernelAt>
std::vector<double> blended(const std::vector<float>& x, double vsini, double resolution, KernelAt kernel_at,
                            const double* factors = nullptr) {
    const int S = kSegments;
    std::vector<int> node(S + 1);
    for (int s = 0; s <= S; ++s) node[s] = int(std::nearbyint(s * (double(kN - 1) / S)));
    std::vector<double> out(kN, 0.0);
    for (int s = 0; s <= S; ++s) {
        const double lam = kStart + kStep * node[s];
        const double w = vsini * lam / kC / kStep;
        const double r = factors ? resolution * factors[s] : resolution;
        const double sigma = std::isinf(r) ? 0.0 : lam / (kFwhmPerSigma * r * kStep);
        int h = 0;
        const std::vector<double> k = kernel_at(w, sigma, h);
        const int lo = s > 0 ? node[s - 1] : node[s], hi = s < S ? node[s + 1] : node[s];
        for (int i = lo; i <= hi; ++i) {
            double wgt = 1;
            if (i <= node[s] && s > 0) wgt = double(i - lo) / std::max(node[s] - lo, 1);
            if (i > node[s] && s < S) wgt = double(hi - i) / std::max(hi - node[s], 1);
            double y = 0;
            for (int m = -h; m <= h; ++m) y += k[m + h] * x[std::clamp(i - m, 0, kN - 1)];
            out[i] += wgt * y;
        }
    }
    return out;
}

// Point samples (broadening = 1): rotation's and the Gaussian's hat weights, convolved.
std::vector<double> reference(const std::vector<float>& x, double vsini, double resolution,
                              const double* factors = nullptr) {
    return blended(x, vsini, resolution, [](double w, double sigma, int& h) {
        const int hr = int(std::ceil(w)) + 1, hg = int(std::ceil(6 * sigma)) + 2;
        const auto kr = rotation_kernel(w, hr), kg = gaussian_kernel(sigma, hg);
        std::vector<double> k(kr.size() + kg.size() - 1, 0.0);
        for (std::size_t i = 0; i < kr.size(); ++i)
            for (std::size_t j = 0; j < kg.size(); ++j) k[i + j] += kr[i] * kg[j];
        h = hr + hg;
        return k;
    }, factors);
}

// Pixel-mean input (docs/model-format.md, broadening = 2): the taps are the inverse real DFT of
// H(omega) = Rot(omega w) exp(-sigma^2 omega^2 / 2) / sinc(omega / 2), Rot here by quadrature of Gray's profile itself
// (the library uses Bessel functions, tabulated), kept to |m| <= ceil(w + 7 sigma) + 16 and normalised.
std::vector<double> band_limited_kernel(double w, double sigma, int& reach) {
    reach = int(std::ceil(w + 7 * sigma)) + 16;
    int nfft = 1024;
    while (nfft < 4 * reach) nfft *= 2;
    const double c1 = 2 * (1 - kEps) / (M_PI * (1 - kEps / 3)), c2 = kEps / (2 * (1 - kEps / 3));
    std::vector<double> k(2 * reach + 1, 0.0);
    for (int j = 0; j <= nfft / 2; ++j) {
        const double om = 2 * M_PI * j / nfft, g = std::exp(-0.5 * sigma * sigma * om * om);
        if (g < 1e-20) break;
        // integral of G(t) cos(om w t) over [-1, 1], t = sin(theta)
        const double rot = w == 0 ? 1.0 : simpson([&](double th) {
            const double G = c1 * std::cos(th) + c2 * std::cos(th) * std::cos(th);
            return G * std::cos(om * w * std::sin(th)) * std::cos(th);
        }, -M_PI / 2, M_PI / 2, 2000);
        const double h = (j == 0 || 2 * j == nfft ? 1.0 : 2.0) * rot * g * (j == 0 ? 1.0 : 0.5 * om / std::sin(0.5 * om));
        for (int m = -reach; m <= reach; ++m) k[m + reach] += h * std::cos(m * om) / nfft;
    }
    double sum = 0;
    for (double v : k) sum += v;
    for (double& v : k) v /= sum;
    return k;
}

std::vector<double> pixel_mean_reference(const std::vector<float>& x, double vsini, double resolution,
                                         const double* factors = nullptr) {
    return blended(x, vsini, resolution, [](double w, double sigma, int& h) {
        h = 0;
        return w > 0 || sigma > 0 ? band_limited_kernel(w, sigma, h) : std::vector<double>{1.0};
    }, factors);
}

std::vector<float> random_spectrum(std::mt19937_64& rng) {
    std::uniform_real_distribution<double> u(0, 1);
    std::vector<float> x(kN);
    std::vector<std::array<double, 3>> lines;
    for (int k = 0; k < 25; ++k) lines.push_back({u(rng) * kN, 0.2 + 3 * u(rng), 0.7 * u(rng)});
    for (int i = 0; i < kN; ++i) {
        double f = 1;
        for (auto& l : lines) f -= l[2] * std::exp(-0.5 * std::pow((i - l[0]) / l[1], 2));
        x[i] = float(std::max(f, 0.02) + 0.002 * (u(rng) - 0.5));
    }
    return x;
}

double max_abs(const std::vector<double>& v) {
    double m = 0;
    for (double x : v) m = std::max(m, std::abs(x));
    return m;
}

}  // namespace

int main() {
    std::mt19937_64 rng(test_seed("test_broadening"));
    const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
    // max_vsini 300 and min R 1000 give kernels of ~16 and ~31 pixels on this 700-pixel grid.
    fastspec::Broadening b(kStart, kStep, kN, kEps, kSegments, 300.0, 1000.0);
    CHECK(b.n_pixels() == std::size_t(kN));
    const double cases[][2] = {{0, inf}, {0, 115000}, {3.7, 60000}, {30, 20000}, {120, 4000}, {300, 1000}, {0, 1000}, {300, inf}};
    for (const auto& c : cases) {
        const double vsini = c[0], resolution = c[1];
        const auto x = random_spectrum(rng);
        std::vector<float> out(kN, NAN), dv(kN, NAN), dr(kN, NAN);
        b.apply(x.data(), vsini, resolution, out.data(), dv.data(), dr.data());
        const auto ref = reference(x, vsini, resolution);
        double worst = 0;
        for (int i = 0; i < kN; ++i) worst = std::max(worst, std::abs(double(out[i]) - ref[i]));  // NaN fails below
        CHECK_MSG(worst < 2e-6 && std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }),
                  "vsini %g R %g: max |core - reference| = %.3g", vsini, resolution, worst);
        if (vsini == 0 && std::isinf(resolution))
            for (int i = 0; i < kN; ++i) CHECK(std::abs(out[i] - x[i]) < 1e-6);
        // Derivatives against central differences of the float64 reference (one-sided at vsini = 0).
        const double hv = std::max(1e-5 * vsini, 1e-5), hr = 1e-5 * (std::isinf(resolution) ? 1.0 : resolution);
        std::vector<double> fd_v(kN), fd_r(kN, 0.0);
        const auto vp = reference(x, vsini + hv, resolution);
        const auto vm = vsini > hv ? reference(x, vsini - hv, resolution) : ref;
        for (int i = 0; i < kN; ++i) fd_v[i] = (vp[i] - vm[i]) / (vsini > hv ? 2 * hv : hv);
        if (!std::isinf(resolution)) {
            const auto rp = reference(x, vsini, resolution + hr), rm = reference(x, vsini, resolution - hr);
            for (int i = 0; i < kN; ++i) fd_r[i] = (rp[i] - rm[i]) / (2 * hr);
        }
        double ev = 0, er = 0;
        for (int i = 0; i < kN; ++i) {
            ev = std::max(ev, std::abs(dv[i] - fd_v[i]));
            er = std::max(er, std::abs(dr[i] - fd_r[i]));
        }
        // One-sided differences at vsini = 0 carry an O(h) error; central ones O(h^2).
        const double tol_v = (vsini > hv ? 2e-4 : 5e-3) * max_abs(fd_v) + 1e-7, tol_r = 2e-4 * max_abs(fd_r) + 1e-9;
        CHECK_MSG(ev <= tol_v, "vsini %g R %g: d/dvsini off by %.3g (scale %.3g)", vsini, resolution, ev, max_abs(fd_v));
        CHECK_MSG(er <= tol_r, "vsini %g R %g: d/dR off by %.3g (scale %.3g)", vsini, resolution, er, max_abs(fd_r));
        // In place (in == out) gives the same result.
        std::vector<float> same = x;
        b.apply(same.data(), vsini, resolution, same.data());
        CHECK(same == out);
    }
    // Equivalent width is conserved away from the edges (the kernels sum to 1).
    {
        std::vector<float> x(kN, 1.0f);
        for (int i = 300; i < 400; ++i) x[i] = float(1 - 0.5 * std::exp(-0.5 * std::pow((i - 350) / 3.0, 2)));
        std::vector<float> y(kN);
        b.apply(x.data(), 150, 3000, y.data());
        double ew_in = 0, ew_out = 0;
        for (int i = 0; i < kN; ++i) ew_in += 1 - x[i], ew_out += 1 - y[i];
        CHECK_MSG(std::abs(ew_out / ew_in - 1) < 1e-5, "equivalent width %.8g -> %.8g", ew_in, ew_out);
    }
    // Pixel-mean input: the same checks against its own float64 reference.
    fastspec::Broadening bm(kStart, kStep, kN, kEps, kSegments, 300.0, 1000.0, fastspec::Sampling::pixel_mean);
    const double pm_cases[][2] = {{0, inf}, {0, 115000}, {3.7, 60000}, {45, 20000}, {300, 1000}};
    for (const auto& c : pm_cases) {
        const double vsini = c[0], resolution = c[1];
        const auto x = random_spectrum(rng);
        std::vector<float> out(kN, NAN), dv(kN, NAN), dr(kN, NAN);
        bm.apply(x.data(), vsini, resolution, out.data(), dv.data(), dr.data());
        const auto ref = pixel_mean_reference(x, vsini, resolution);
        double worst = 0;
        for (int i = 0; i < kN; ++i) worst = std::max(worst, std::abs(double(out[i]) - ref[i]));
        CHECK_MSG(worst < 2e-6 && std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }),
                  "pixel means, vsini %g R %g: max |core - reference| = %.3g", vsini, resolution, worst);
        const double hv = std::max(1e-5 * vsini, 1e-5), hr = 1e-5 * (std::isinf(resolution) ? 1.0 : resolution);
        std::vector<double> fd_v(kN), fd_r(kN, 0.0);
        if (vsini > hv) {
            const auto vp = pixel_mean_reference(x, vsini + hv, resolution), vm = pixel_mean_reference(x, vsini - hv, resolution);
            for (int i = 0; i < kN; ++i) fd_v[i] = (vp[i] - vm[i]) / (2 * hv);
        }  // at vsini = 0 the kernel is even in vsini: the derivative is 0
        if (!std::isinf(resolution)) {
            const auto rp = pixel_mean_reference(x, vsini, resolution + hr), rm = pixel_mean_reference(x, vsini, resolution - hr);
            for (int i = 0; i < kN; ++i) fd_r[i] = (rp[i] - rm[i]) / (2 * hr);
        }
        double ev = 0, er = 0;
        for (int i = 0; i < kN; ++i) {
            ev = std::max(ev, std::abs(dv[i] - fd_v[i]));
            er = std::max(er, std::abs(dr[i] - fd_r[i]));
        }
        CHECK_MSG(ev <= 2e-4 * max_abs(fd_v) + 1e-7, "pixel means, vsini %g R %g: d/dvsini off by %.3g (scale %.3g)", vsini,
                  resolution, ev, max_abs(fd_v));
        CHECK_MSG(er <= 2e-4 * max_abs(fd_r) + 1e-9, "pixel means, vsini %g R %g: d/dR off by %.3g (scale %.3g)", vsini,
                  resolution, er, max_abs(fd_r));
    }
    // A line-spread function varying along the range: per-node resolution factors (node s takes R * g_s), against
    // the reference with the same per-node R; d/dR is the derivative by the label R with the factors held.
    const std::array<double, kSegments + 1> g = {0.7, 1.0, 1.6, 1.25}, ones = {1, 1, 1, 1};
    for (const auto* stage : {&b, &bm}) {
        const bool pm = stage == &bm;
        auto ref_at = [&](const std::vector<float>& x, double vsini, double resolution, const double* f) {
            return pm ? pixel_mean_reference(x, vsini, resolution, f) : reference(x, vsini, resolution, f);
        };
        for (const auto& c : {std::array<double, 2>{3.7, 20000}, std::array<double, 2>{0, 3000}}) {
            const double vsini = c[0], resolution = c[1];
            const auto x = random_spectrum(rng);
            std::vector<float> out(kN, NAN), dv(kN, NAN), dr(kN, NAN), dz(kN, NAN);
            stage->apply(x.data(), vsini, resolution, 0.0, out.data(), dv.data(), dr.data(), dz.data(), g.data());
            const auto ref = ref_at(x, vsini, resolution, g.data());
            const double hr = 1e-5 * resolution;
            const auto rp = ref_at(x, vsini, resolution + hr, g.data()), rm = ref_at(x, vsini, resolution - hr, g.data());
            std::vector<double> fd_r(kN);
            double worst = 0, er = 0;
            for (int i = 0; i < kN; ++i) {
                fd_r[i] = (rp[i] - rm[i]) / (2 * hr);
                worst = std::max(worst, std::abs(double(out[i]) - ref[i]));
                er = std::max(er, std::abs(dr[i] - fd_r[i]));
            }
            CHECK_MSG(worst < 2e-6 && std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }),
                      "%s, factors, vsini %g R %g: max |core - reference| = %.3g", pm ? "pixel means" : "points", vsini,
                      resolution, worst);
            CHECK_MSG(er <= 2e-4 * max_abs(fd_r) + 1e-9, "%s, factors, vsini %g R %g: d/dR off by %.3g (scale %.3g)",
                      pm ? "pixel means" : "points", vsini, resolution, er, max_abs(fd_r));
            // all ones: the call without factors, bit for bit
            std::vector<float> o1(kN), d1(kN), o0(kN), d0(kN);
            stage->apply(x.data(), vsini, resolution, 0.0, o1.data(), nullptr, d1.data(), nullptr, ones.data());
            stage->apply(x.data(), vsini, resolution, o0.data(), nullptr, d0.data());
            CHECK(o1 == o0 && d1 == d0);
        }
    }

    // Bad input: a clear InputError, nothing written.
    std::vector<float> x(kN, 1.0f), y(kN, -7.0f);
    using fastspec::InputError;
    check_throws<InputError>([&] { b.apply(x.data(), -1, 5000, y.data()); }, "vsini = -1 km/s is outside [0, 300]", "neg vsini");
    check_throws<InputError>([&] { b.apply(x.data(), 301, 5000, y.data()); }, "outside [0, 300]", "big vsini");
    check_throws<InputError>([&] { b.apply(x.data(), nan, 5000, y.data()); }, "vsini = nan", "nan vsini");
    check_throws<InputError>([&] { b.apply(x.data(), 10, 999, y.data()); }, "resolution = 999 is below 1000", "small R");
    check_throws<InputError>([&] { b.apply(x.data(), 10, nan, y.data()); }, "resolution = nan", "nan R");
    check_throws<InputError>([&] { b.apply(nullptr, 10, 5000, y.data()); }, "must not be null", "null");
    auto apply_g = [&](double resolution, std::array<double, kSegments + 1> f) {
        b.apply(x.data(), 10, resolution, 0.0, y.data(), nullptr, nullptr, nullptr, f.data());
    };
    check_throws<InputError>([&] { apply_g(5000, {1, nan, 1, 1}); }, "resolution factor nan at node 1 (", "nan g");
    check_throws<InputError>([&] { apply_g(5000, {1, 1, 0, 1}); }, "must be finite and > 0", "zero g");
    check_throws<InputError>([&] { apply_g(5000, {1, 1, 1, inf}); }, "resolution factor inf at node 3", "inf g");
    check_throws<InputError>([&] { apply_g(5000, {1, 1, 1, 0.1}); }, "= 500 at node 3 (4484.95 Å) is below the lowest R",
                             "R g below min");
    check_throws<InputError>([&] { apply_g(inf, {1, 1, 1, 1}); }, "resolution factors scale a finite R", "inf R");
    CHECK(std::all_of(y.begin(), y.end(), [](float v) { return v == -7.0f; }));
    using fastspec::Error;
    check_throws<Error>([] { fastspec::Broadening(kStart, kStep, kN, 1.5); }, "epsilon = 1.5", "epsilon");
    check_throws<Error>([] { fastspec::Broadening(kStart, kStep, kN, 0.6, 0); }, "segments = 0", "segments");
    check_throws<Error>([] { fastspec::Broadening(kStart, -kStep, kN); }, "wavelength_step > 0", "step");
    check_throws<Error>([] { fastspec::Broadening(kStart, kStep, 50, 0.6, 8, 300, 1000); }, "too wide", "narrow grid");
    return finish("test_broadening");
}
