// The C API (fastspec/fastspec.h): every entry point catches everything and turns it into a return code and a
// per-thread message.
#include "fastspec/fastspec.h"

#include <algorithm>
#include <new>
#include <string>

#include "fastspec/fastspec.hpp"

struct fastspec_model {
    fastspec::Model model;
};
struct fastspec_decoder {
    fastspec::Decoder decoder;
};

namespace {
thread_local std::string g_last_error;

template <class F>
int guarded(F&& f) {
    try {
        f();
        return FASTSPEC_OK;
    } catch (const fastspec::FileAccessError& e) {
        g_last_error = e.what();
        return FASTSPEC_ERR_FILE;
    } catch (const fastspec::ModelFileError& e) {
        g_last_error = e.what();
        return FASTSPEC_ERR_MODEL;
    } catch (const fastspec::InputError& e) {
        g_last_error = e.what();
        return FASTSPEC_ERR_INPUT;
    } catch (const std::bad_alloc&) {
        g_last_error = "out of memory";
        return FASTSPEC_ERR_OTHER;
    } catch (const std::exception& e) {
        g_last_error = e.what();
        return FASTSPEC_ERR_OTHER;
    } catch (...) {
        g_last_error = "unknown error";
        return FASTSPEC_ERR_OTHER;
    }
}

int null_argument(const char* what) {
    g_last_error = std::string(what) + " must not be NULL";
    return FASTSPEC_ERR_INPUT;
}
}  // namespace

extern "C" {

const char* fastspec_last_error(void) { return g_last_error.c_str(); }

int fastspec_model_load(const char* path, fastspec_model** model) {
    if (!path || !model) return null_argument("path and model");
    *model = nullptr;
    return guarded([&] { *model = new fastspec_model{fastspec::Model::load(path)}; });
}

void fastspec_model_free(fastspec_model* model) { delete model; }

size_t fastspec_model_n_labels(const fastspec_model* model) { return model ? model->model.n_labels() : 0; }
size_t fastspec_model_n_pixels(const fastspec_model* model) { return model ? model->model.n_pixels() : 0; }
size_t fastspec_model_latent_dim(const fastspec_model* model) { return model ? model->model.latent_dim() : 0; }

const char* fastspec_model_label_name(const fastspec_model* model, size_t i) {
    if (!model || i >= model->model.n_labels()) return nullptr;
    return model->model.labels()[i].name.c_str();
}

int fastspec_model_label_range(const fastspec_model* model, size_t i, double* min, double* max) {
    if (!model || !min || !max) return null_argument("model, min and max");
    if (i >= model->model.n_labels()) {
        g_last_error = "label index " + std::to_string(i) + " >= n_labels " + std::to_string(model->model.n_labels());
        return FASTSPEC_ERR_INPUT;
    }
    *min = model->model.labels()[i].min;
    *max = model->model.labels()[i].max;
    return FASTSPEC_OK;
}

int fastspec_model_wavelength(const fastspec_model* model, double* wavelength) {
    if (!model || !wavelength) return null_argument("model and wavelength");
    return guarded([&] {
        const auto wl = model->model.wavelength();
        std::copy(wl.begin(), wl.end(), wavelength);
    });
}

int fastspec_model_is_vacuum(const fastspec_model* model) {
    return model && model->model.medium() == fastspec::Medium::vacuum ? 1 : 0;
}

int fastspec_decoder_new(const fastspec_model* model, int threads, fastspec_decoder** decoder) {
    if (!model || !decoder) return null_argument("model and decoder");
    *decoder = nullptr;
    return guarded([&] {
        fastspec::DecoderOptions options;
        options.threads = threads;
        *decoder = new fastspec_decoder{fastspec::Decoder(model->model, options)};
    });
}

void fastspec_decoder_free(fastspec_decoder* decoder) { delete decoder; }

int fastspec_forward(const fastspec_decoder* decoder, const double* labels, size_t n, float* flux, int clip) {
    if (!decoder) return null_argument("decoder");
    return guarded([&] { decoder->decoder.forward(labels, n, flux, nullptr, clip != 0); });
}

int fastspec_forward_jacobian(const fastspec_decoder* decoder, const double* labels, size_t n, float* flux,
                              float* jacobian, int clip) {
    if (!decoder) return null_argument("decoder");
    return guarded([&] { decoder->decoder.forward_jacobian(labels, n, flux, jacobian, nullptr, clip != 0); });
}

int fastspec_forward_vmac(const fastspec_decoder* decoder, const double* labels, const double* vmac, size_t n,
                          float* flux, int clip) {
    if (!decoder) return null_argument("decoder");
    return guarded([&] { decoder->decoder.forward(labels, n, flux, nullptr, clip != 0, vmac); });
}

int fastspec_forward_jacobian_vmac(const fastspec_decoder* decoder, const double* labels, const double* vmac,
                                   size_t n, float* flux, float* jacobian, float* jacobian_vmac, int clip) {
    if (!decoder) return null_argument("decoder");
    return guarded([&] {
        decoder->decoder.forward_jacobian(labels, n, flux, jacobian, nullptr, clip != 0, vmac, jacobian_vmac);
    });
}

double fastspec_max_vmac(void) { return fastspec::Broadening::max_vmac(); }

size_t fastspec_decoder_stage_node_count(const fastspec_decoder* decoder) {
    return decoder ? decoder->decoder.stage_node_wavelengths().size() : 0;
}

int fastspec_decoder_stage_node_wavelengths(const fastspec_decoder* decoder, double* wavelength) {
    if (!decoder || !wavelength) return null_argument("decoder and wavelength");
    return guarded([&] {
        const auto wl = decoder->decoder.stage_node_wavelengths();
        std::copy(wl.begin(), wl.end(), wavelength);
    });
}

int fastspec_forward_lsf(const fastspec_decoder* decoder, const double* labels, const double* vmac,
                         const double* resolution_factors, size_t n, float* flux, float* jacobian,
                         float* jacobian_vmac, int clip) {
    if (!decoder) return null_argument("decoder");
    if (jacobian_vmac && !jacobian) {
        g_last_error = "jacobian_vmac needs jacobian (NULL: forward only)";
        return FASTSPEC_ERR_INPUT;
    }
    return guarded([&] {
        if (jacobian)
            decoder->decoder.forward_jacobian(labels, n, flux, jacobian, nullptr, clip != 0, vmac, jacobian_vmac,
                                              resolution_factors);
        else
            decoder->decoder.forward(labels, n, flux, nullptr, clip != 0, vmac, resolution_factors);
    });
}

}  // extern "C"
