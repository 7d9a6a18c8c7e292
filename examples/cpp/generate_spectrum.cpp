// generate_spectrum: one synthetic spectrum from a fastspec model file.
//
//   generate_spectrum MODEL.fsm TEFF LOGG VSINI MH VMIC R [OUTPUT]
//
// Writes "wavelength flux" lines (Å in the model's medium, normalised flux) to OUTPUT or stdout.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "fastspec/fastspec.hpp"

static int usage(const char* argv0) {
    std::cerr << "usage: " << argv0 << " MODEL.fsm TEFF LOGG VSINI MH VMIC R [OUTPUT]\n"
              << "  TEFF [K], LOGG [dex], VSINI [km/s], MH [dex], VMIC [km/s], R (resolving power)\n"
              << "  writes 'wavelength flux' lines to OUTPUT, or to stdout without it\n"
              << "  example: " << argv0 << " model.fsm 5777 4.44 2 0 1 50000 sun.txt\n";
    return 2;
}

int main(int argc, char** argv) {
    if (argc != 8 && argc != 9) return usage(argv[0]);
    try {
        const auto model = fastspec::Model::load(argv[1]);
        if (model.n_labels() != 6) {
            std::cerr << argv[1] << ": this example expects a model with 6 labels, it has " << model.n_labels() << "\n";
            return 1;
        }
        std::vector<double> labels;
        for (int i = 2; i < 8; ++i) {
            char* end = nullptr;
            const double v = std::strtod(argv[i], &end);
            if (end == argv[i] || *end) {
                std::cerr << "label '" << model.labels()[i - 2].name << "': '" << argv[i] << "' is not a number\n";
                return usage(argv[0]);
            }
            labels.push_back(v);
        }
        fastspec::Decoder decoder(model);
        std::vector<float> flux(model.n_pixels());
        decoder.forward(labels.data(), 1, flux.data());  // z = 0: the mean spectrum for these labels

        std::ofstream file;
        if (argc == 9) {
            file.open(argv[8]);
            if (!file) {
                std::cerr << argv[8] << ": cannot open for writing\n";
                return 1;
            }
        }
        std::ostream& out = argc == 9 ? file : std::cout;
        const auto wl = model.wavelength();
        char line[64];
        for (std::size_t i = 0; i < flux.size(); ++i) {
            std::snprintf(line, sizeof line, "%.4f %.7g\n", wl[i], double(flux[i]));
            out << line;
        }
        return out ? 0 : 1;
    } catch (const fastspec::Error& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
