/* fastspec: the C API of the inference core (for C and, through ISO_C_BINDING, Fortran).
 *
 * A thin layer over the C++ API (fastspec.hpp) in the same library: opaque handles, plain arrays, an error
 * code from every call and no exception across the boundary. After a call that returned non-zero,
 * fastspec_last_error() gives the message (per thread). A model file of format version 2 carries the
 * broadening stage: pass all six labels (v sin i and R included); the core applies it.
 *
 *     fastspec_model* model;
 *     fastspec_decoder* dec;
 *     if (fastspec_model_load("default.fsm", &model) || fastspec_decoder_new(model, 1, &dec))
 *         fprintf(stderr, "%s\n", fastspec_last_error());
 *     double labels[6] = {5777, 4.44, 2.0, 0.0, 1.0, 50000};
 *     float* flux = malloc(fastspec_model_n_pixels(model) * sizeof(float));
 *     fastspec_forward(dec, labels, 1, flux, 0);
 *     fastspec_decoder_free(dec); fastspec_model_free(model);
 */
#ifndef FASTSPEC_H
#define FASTSPEC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fastspec_model fastspec_model;
typedef struct fastspec_decoder fastspec_decoder;

/* Return codes. */
enum {
    FASTSPEC_OK = 0,
    FASTSPEC_ERR_FILE = 1,      /* the model file cannot be opened or read */
    FASTSPEC_ERR_MODEL = 2,     /* the model file is not a valid model */
    FASTSPEC_ERR_INPUT = 3,     /* bad labels (not finite, out of range without clip), null pointers */
    FASTSPEC_ERR_OTHER = 4      /* anything else (out of memory, ...) */
};

/* The message of the last failed call on this thread ("" if none). Valid until the next failing call. */
const char* fastspec_last_error(void);

int fastspec_model_load(const char* path, fastspec_model** model);
void fastspec_model_free(fastspec_model* model); /* NULL is fine */

size_t fastspec_model_n_labels(const fastspec_model* model);
size_t fastspec_model_n_pixels(const fastspec_model* model);
size_t fastspec_model_latent_dim(const fastspec_model* model);
/* Label i's name (NUL-terminated, owned by the model) and trained range; NULL / non-zero for a bad index. */
const char* fastspec_model_label_name(const fastspec_model* model, size_t i);
int fastspec_model_label_range(const fastspec_model* model, size_t i, double* min, double* max);
/* Wavelength of every pixel in Å (n_pixels doubles) and whether it is in vacuum (1) or air (0). */
int fastspec_model_wavelength(const fastspec_model* model, double* wavelength);
int fastspec_model_is_vacuum(const fastspec_model* model);

/* A decoder on a model (the model may be freed afterwards). threads: OpenBLAS threads, 1 is best on small
 * machines. Const and thread-safe: concurrent calls on one decoder are fine. */
int fastspec_decoder_new(const fastspec_model* model, int threads, fastspec_decoder** decoder);
void fastspec_decoder_free(fastspec_decoder* decoder);

/* labels: (n, n_labels) row-major in physical units; flux: (n, n_pixels); clip: clamp out-of-range labels
 * instead of failing. z = 0. Every input is checked before anything is written. */
int fastspec_forward(const fastspec_decoder* decoder, const double* labels, size_t n, float* flux, int clip);
/* forward plus dF/d(label): jacobian (n, n_pixels, n_labels) row-major, per unit of each label. */
int fastspec_forward_jacobian(const fastspec_decoder* decoder, const double* labels, size_t n, float* flux,
                              float* jacobian, int clip);

/* The same with radial-tangential macroturbulence (Gray's profile, applied in the broadening stage; not a label):
 * vmac (n) km/s, one per row, each in [0, fastspec_max_vmac()] (NULL: 0 for every row, the calls above bit for bit).
 * Only format-3 models (a pixel-mean stage) take vmac > 0; others return FASTSPEC_ERR_INPUT naming their format.
 * jacobian_vmac: NULL, or (n, n_pixels) floats for dF/dvmac per km/s. */
int fastspec_forward_vmac(const fastspec_decoder* decoder, const double* labels, const double* vmac, size_t n,
                          float* flux, int clip);
int fastspec_forward_jacobian_vmac(const fastspec_decoder* decoder, const double* labels, const double* vmac,
                                   size_t n, float* flux, float* jacobian, float* jacobian_vmac, int clip);
double fastspec_max_vmac(void); /* 50 km/s */

/* A line-spread function that varies along the range. The broadening stage takes its kernel widths at a few nodes
 * (docs/model-format.md, "Line-spread function"): their count (0 without a stage) and wavelengths in Å, model medium. */
size_t fastspec_decoder_stage_node_count(const fastspec_decoder* decoder);
int fastspec_decoder_stage_node_wavelengths(const fastspec_decoder* decoder, double* wavelength);
/* forward, or with jacobian forward_jacobian, in one call with every option: vmac as above (NULL: 0);
 * resolution_factors NULL, or node_count values g_s shared by all n rows: node s takes R_s = R * g_s (R the row's
 * resolution label: the LSF's scale, g its shape); each g_s finite and > 0, each R_s within the R label's range, else
 * FASTSPEC_ERR_INPUT naming the row, node and wavelength. NULL and all ones give the calls above bit for bit.
 * jacobian: NULL (forward only) or (n, n_pixels, n_labels), its R column dF/dR with g held; jacobian_vmac: NULL or
 * (n, n_pixels), only with jacobian. */
int fastspec_forward_lsf(const fastspec_decoder* decoder, const double* labels, const double* vmac,
                         const double* resolution_factors, size_t n, float* flux, float* jacobian,
                         float* jacobian_vmac, int clip);

#ifdef __cplusplus
}
#endif

#endif /* FASTSPEC_H */
