"""Display: the progress panel, reports, plots and PNG images."""
