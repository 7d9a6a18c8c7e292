// Physical labels -> decoder input: validation, clipping and normalisation, in one place.
#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "internal.hpp"

namespace fastspec::detail {

namespace {
std::string num(double v) {
    std::ostringstream os;
    os << std::setprecision(10) << v;
    return os.str();
}
}  // namespace

void validate_inputs(const Model& model, const double* labels, std::size_t n, const float* z, bool clip) {
    const auto& info = model.labels();
    const std::size_t nl = info.size(), nz = model.latent_dim();
    for (std::size_t r = 0; r < n; ++r) {
        const std::string row = n > 1 ? "row " + std::to_string(r) + ": " : "";
        for (std::size_t j = 0; j < nl; ++j) {
            const double v = labels[r * nl + j];
            const LabelInfo& l = info[j];
            if (!std::isfinite(v)) throw InputError(row + "label '" + l.name + "' = " + num(v) + " is not finite");
            if (!clip && (v < l.min || v > l.max))
                throw InputError(row + "label '" + l.name + "' = " + num(v) + " is outside [" + num(l.min) + ", " +
                                 num(l.max) + "]; pass clip=true to clamp");
        }
        if (z)
            for (std::size_t j = 0; j < nz; ++j)
                if (!std::isfinite(z[r * nz + j]))
                    throw InputError(row + "z[" + std::to_string(j) + "] = " + num(z[r * nz + j]) + " is not finite");
    }
}

void make_input_rows(const Model& model, const double* labels, const float* z, std::size_t rows, bool clip,
                     float* dst) {
    const auto& info = model.labels();
    const std::size_t nl = info.size(), nz = model.latent_dim(), width = model.input_dim();
    for (std::size_t r = 0; r < rows; ++r) {
        float* row = dst + r * width;
        if (z)
            std::copy(z + r * nz, z + (r + 1) * nz, row);
        else
            std::fill(row, row + nz, 0.0f);
        std::size_t col = nz;
        for (std::size_t j = 0; j < nl; ++j) {
            const LabelInfo& l = info[j];
            if (l.role != LabelRole::network) continue;  // v sin i and R of a broadening stage
            double v = labels[r * nl + j];
            if (clip) v = std::clamp(v, l.min, l.max);
            const double s = l.scaling == Scaling::log10 ? std::log10(v) : v;
            row[col++] = float((s - l.norm_offset) / l.norm_scale);
        }
    }
}

void network_tangent_scales(const Model& model, const double* labels, std::size_t rows, bool clip, float* dst) {
    const auto& info = model.labels();
    const std::size_t nl = info.size();
    for (std::size_t r = 0; r < rows; ++r) {
        std::size_t t = 0;
        for (std::size_t j = 0; j < nl; ++j) {
            const LabelInfo& l = info[j];
            if (l.role != LabelRole::network) continue;
            const double v = labels[r * nl + j];
            // A clamped label does not move the output: its derivative is 0 outside the range.
            const double ds = l.scaling == Scaling::log10 ? 1.0 / (v * std::log(10.0)) : 1.0;
            dst[r * model.n_network_labels() + t++] = (clip && (v < l.min || v > l.max)) ? 0.0f : float(ds / l.norm_scale);
        }
    }
}

}  // namespace fastspec::detail
