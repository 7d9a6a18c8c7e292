// fit_spectrum: fit the six labels of a spectrum with Levenberg-Marquardt and the core's analytic Jacobian.
//
//   fit_spectrum MODEL.fsm TEFF LOGG VSINI MH VMIC R [SNR [SEED]]
//
// Makes a test spectrum with the model at the given labels, adds Gaussian noise at signal-to-noise SNR
// (default 100; 0 = noiseless, fitted with errors of 1e-3), then fits it from several starts and prints
// one line per label, "name fit uncertainty true", then "chi2 <chi2> <pixels> <reduced chi2>".
//
// The fit runs in normalised coordinates u in [-1, 1] over each label's trained range (log10 for R, like
// the model's input), so the six directions have comparable scales; a step that leaves the box is
// projected back onto it. Each iteration solves the 6x6 damped normal equations by Cholesky.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "fastspec/fastspec.hpp"

namespace {

constexpr int NL = 6;
using Vec = std::array<double, NL>;
using Mat = std::array<std::array<double, NL>, NL>;

int usage(const char* argv0) {
    std::cerr << "usage: " << argv0 << " MODEL.fsm TEFF LOGG VSINI MH VMIC R [SNR [SEED]]\n"
              << "  generates a spectrum at these labels, adds noise at SNR (default 100, 0 = none),\n"
              << "  fits the labels back and prints 'name fit uncertainty true' lines and 'chi2 ...'\n";
    return 2;
}

// Solves (A) x = b in place for a symmetric positive definite 6x6 A; false if A is not positive definite.
bool cholesky_solve(Mat A, Vec& b) {
    for (int j = 0; j < NL; ++j) {
        for (int k = 0; k < j; ++k) A[j][j] -= A[j][k] * A[j][k];
        if (!(A[j][j] > 0)) return false;
        A[j][j] = std::sqrt(A[j][j]);
        for (int i = j + 1; i < NL; ++i) {
            for (int k = 0; k < j; ++k) A[i][j] -= A[i][k] * A[j][k];
            A[i][j] /= A[j][j];
        }
    }
    for (int i = 0; i < NL; ++i) {  // L y = b
        for (int k = 0; k < i; ++k) b[i] -= A[i][k] * b[k];
        b[i] /= A[i][i];
    }
    for (int i = NL - 1; i >= 0; --i) {  // L^T x = y
        for (int k = i + 1; k < NL; ++k) b[i] -= A[k][i] * b[k];
        b[i] /= A[i][i];
    }
    return true;
}

// The map between physical labels x and fit coordinates u in [-1, 1].
struct Box {
    std::vector<fastspec::LabelInfo> info;
    double s(int j, double x) const { return info[j].scaling == fastspec::Scaling::log10 ? std::log10(x) : x; }
    Vec to_x(const Vec& u) const {
        Vec x;
        for (int j = 0; j < NL; ++j) {
            const double lo = s(j, info[j].min), hi = s(j, info[j].max);
            const double sv = lo + (u[j] + 1) * 0.5 * (hi - lo);
            x[j] = std::clamp(info[j].scaling == fastspec::Scaling::log10 ? std::pow(10.0, sv) : sv, info[j].min,
                              info[j].max);
        }
        return x;
    }
    Vec dx_du(const Vec& u) const {
        const Vec x = to_x(u);
        Vec d;
        for (int j = 0; j < NL; ++j) {
            const double half = 0.5 * (s(j, info[j].max) - s(j, info[j].min));
            d[j] = info[j].scaling == fastspec::Scaling::log10 ? x[j] * std::log(10.0) * half : half;
        }
        return d;
    }
};

struct Fit {
    Vec u{};
    double chi2 = INFINITY;
    int iterations = 0;
};

class Fitter {
public:
    Fitter(const fastspec::Decoder& d, const std::vector<double>& flux, const std::vector<double>& sigma)
        : decoder_(d), box_{d.model().labels()}, flux_(flux), sigma_(sigma), np_(d.model().n_pixels()),
          model_(np_), jac_(np_ * NL) {}

    const Box& box() const { return box_; }

    double chi2(const Vec& u) {
        const Vec x = box_.to_x(u);
        decoder_.forward(x.data(), 1, model_.data());
        ++forward_calls;
        double c = 0;
        for (std::size_t p = 0; p < np_; ++p) {
            const double r = (model_[p] - flux_[p]) / sigma_[p];
            c += r * r;
        }
        return c;
    }

    // J^T J and J^T r over the weighted residuals, J in the coordinates u (du_scale) or physical (ones).
    double normal_equations(const Vec& u, const Vec& scale, Mat& A, Vec& g) {
        const Vec x = box_.to_x(u);
        decoder_.forward_jacobian(x.data(), 1, model_.data(), jac_.data());
        ++jacobian_calls;
        A = {};
        g = {};
        double c = 0;
        for (std::size_t p = 0; p < np_; ++p) {
            const double w = 1.0 / sigma_[p], r = (model_[p] - flux_[p]) * w;
            c += r * r;
            Vec jp;
            for (int j = 0; j < NL; ++j) jp[j] = jac_[p * NL + j] * scale[j] * w;
            for (int i = 0; i < NL; ++i) {
                g[i] += jp[i] * r;
                for (int j = 0; j <= i; ++j) A[i][j] += jp[i] * jp[j];
            }
        }
        for (int i = 0; i < NL; ++i)
            for (int j = i + 1; j < NL; ++j) A[i][j] = A[j][i];
        return c;
    }

    Fit levenberg_marquardt(Vec u) {
        Fit f;
        f.u = u;
        double lambda = 1e-3;
        Mat A;
        Vec g;
        f.chi2 = normal_equations(f.u, box_.dx_du(f.u), A, g);
        for (f.iterations = 0; f.iterations < 200; ++f.iterations) {
            bool improved = false;
            double new_chi2 = f.chi2;
            Vec trial{};
            for (int attempt = 0; attempt < 30 && !improved; ++attempt) {
                Mat D = A;
                Vec step = g;
                for (int j = 0; j < NL; ++j) D[j][j] += lambda * std::max(A[j][j], 1e-12);
                if (!cholesky_solve(D, step)) {
                    lambda *= 10;
                    continue;
                }
                for (int j = 0; j < NL; ++j) trial[j] = std::clamp(f.u[j] - step[j], -1.0, 1.0);
                new_chi2 = chi2(trial);
                if (new_chi2 < f.chi2) {
                    improved = true;
                    lambda = std::max(lambda / 3, 1e-9);
                } else {
                    lambda *= 4;
                }
            }
            if (!improved) break;  // no step lowers chi2 any more: a minimum (or the box edge)
            const double gain = f.chi2 - new_chi2;
            f.u = trial;
            f.chi2 = normal_equations(f.u, box_.dx_du(f.u), A, g);
            if (gain < 1e-9 * f.chi2 + 1e-12) break;
        }
        return f;
    }

    // The covariance of the physical labels, (J^T J)^-1 at u, column by column.
    Mat covariance(const Vec& u) {
        Vec ones;
        ones.fill(1.0);
        Mat A, cov{};
        Vec g;
        normal_equations(u, ones, A, g);
        for (int j = 0; j < NL; ++j) {
            Vec e{};
            e[j] = 1;
            if (!cholesky_solve(A, e)) e.fill(NAN);
            for (int i = 0; i < NL; ++i) cov[i][j] = e[i];
        }
        return cov;
    }

    long forward_calls = 0, jacobian_calls = 0;

private:
    const fastspec::Decoder& decoder_;
    Box box_;
    const std::vector<double>& flux_;
    const std::vector<double>& sigma_;
    std::size_t np_;
    std::vector<float> model_, jac_;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc < 8 || argc > 10) return usage(argv[0]);
    try {
        const auto model = fastspec::Model::load(argv[1]);
        if (model.n_labels() != NL) {
            std::cerr << argv[1] << ": this example expects a model with 6 labels, it has " << model.n_labels() << "\n";
            return 1;
        }
        std::vector<double> args;
        for (int i = 2; i < argc; ++i) {
            char* end = nullptr;
            const double v = std::strtod(argv[i], &end);
            if (end == argv[i] || *end) {
                std::cerr << "'" << argv[i] << "' is not a number\n";
                return usage(argv[0]);
            }
            args.push_back(v);
        }
        Vec truth;
        std::copy(args.begin(), args.begin() + NL, truth.begin());
        const double snr = argc > 8 ? args[6] : 100.0;
        const unsigned long seed = argc > 9 ? static_cast<unsigned long>(args[7]) : 1;

        fastspec::Decoder decoder(model);
        const std::size_t np = model.n_pixels();
        std::vector<float> clean(np);
        decoder.forward(truth.data(), 1, clean.data());  // validates the labels (range, finite)
        std::mt19937_64 gen(seed);
        std::normal_distribution<double> normal(0.0, 1.0);
        std::vector<double> flux(np), sigma(np);
        for (std::size_t p = 0; p < np; ++p) {
            sigma[p] = snr > 0 ? std::max(std::abs(double(clean[p])), 1e-3) / snr : 1e-3;
            flux[p] = clean[p] + (snr > 0 ? sigma[p] * normal(gen) : 0.0);
        }

        // Starts: the middle of the box and random points; keep the lowest chi2.
        const auto t0 = std::chrono::steady_clock::now();
        Fitter fitter(decoder, flux, sigma);
        std::uniform_real_distribution<double> uniform(-0.9, 0.9);
        Fit best;
        for (int start = 0; start < 8; ++start) {
            Vec u{};
            if (start > 0)
                for (auto& v : u) v = uniform(gen);
            const Fit f = fitter.levenberg_marquardt(u);
            if (f.chi2 < best.chi2) best = f;
        }
        const Vec x = fitter.box().to_x(best.u);
        const Mat cov = fitter.covariance(best.u);
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "fit: %.3f s, %ld forward and %ld Jacobian calls over 8 starts\n", seconds,
                     fitter.forward_calls, fitter.jacobian_calls);
        for (int j = 0; j < NL; ++j)
            std::printf("%s %.10g %.6g %.10g\n", model.labels()[j].name.c_str(), x[j], std::sqrt(cov[j][j]), truth[j]);
        std::printf("chi2 %.8g %zu %.6g\n", best.chi2, np, best.chi2 / double(np - NL));
        return 0;
    } catch (const fastspec::Error& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
