mod token;
