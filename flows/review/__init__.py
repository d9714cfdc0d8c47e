"""The review page: operators label what the line decided; engineers see how each product is doing."""
