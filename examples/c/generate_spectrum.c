/* Example: one spectrum and its Jacobian through the C API (fastspec/fastspec.h).
 *   generate_spectrum_c MODEL.fsm TEFF LOGG VSINI MH VMIC R    -> "wavelength flux dF/dTeff" per line on stdout
 * Exit status 1 with the library's message on any error. */
#include <fastspec/fastspec.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char** argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s MODEL.fsm TEFF LOGG VSINI MH VMIC R\n", argv[0]);
        return 2;
    }
    fastspec_model* model = NULL;
    fastspec_decoder* decoder = NULL;
    double labels[6];
    for (int i = 0; i < 6; ++i) labels[i] = atof(argv[i + 2]);
    int status = 1;
    float *flux = NULL, *jac = NULL;
    double* wave = NULL;
    if (fastspec_model_load(argv[1], &model) != FASTSPEC_OK || fastspec_decoder_new(model, 1, &decoder) != FASTSPEC_OK)
        goto fail;
    if (fastspec_model_n_labels(model) != 6) {
        fprintf(stderr, "%s: expected a model of 6 labels\n", argv[1]);
        goto done;
    }
    size_t n = fastspec_model_n_pixels(model), nl = fastspec_model_n_labels(model);
    flux = malloc(n * sizeof *flux);
    jac = malloc(n * nl * sizeof *jac);
    wave = malloc(n * sizeof *wave);
    if (!flux || !jac || !wave) {
        fprintf(stderr, "out of memory\n");
        goto done;
    }
    if (fastspec_model_wavelength(model, wave) != FASTSPEC_OK ||
        fastspec_forward_jacobian(decoder, labels, 1, flux, jac, 0) != FASTSPEC_OK)
        goto fail;
    for (size_t p = 0; p < n; ++p) printf("%.4f %.8g %.8g\n", wave[p], flux[p], jac[p * nl + 0]);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "fastspec: %s\n", fastspec_last_error());
done:
    free(flux);
    free(jac);
    free(wave);
    fastspec_decoder_free(decoder);
    fastspec_model_free(model);
    return status;
}
